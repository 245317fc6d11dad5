"""The app's session store and tool pool (the image-embedding cache), and its --conf parsing, without a server."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("monailabel")

from monailabel_app.lib.config import AppConfig  # noqa: E402
from monailabel_app.lib.errors import ConfigError, RequestError  # noqa: E402
from monailabel_app.lib.sessions import Session, SessionStore, SliceKey, ToolPool  # noqa: E402
from tests.conftest import FakeTool  # noqa: E402

IMAGE = np.zeros((32, 48, 3), np.uint8)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _session(store: SessionStore) -> Session:
    return Session(store.new_id(), SliceKey("img", None, 2), IMAGE, "segment the liver", "liver")


def _status(exc_info) -> tuple[int, str]:
    return exc_info.value.status_code, exc_info.value.detail


def test_sessions_expire_after_their_ttl_since_last_use():
    clock = _Clock()
    store = SessionStore(ttl_s=10, max_sessions=4, clock=clock)
    session = _session(store)
    store.add(session)
    clock.now = 9
    assert store.get(session.id) is session  # using it restarts its time to live
    clock.now = 18
    assert store.get(session.id) is session
    clock.now = 28.5
    with pytest.raises(RequestError) as exc:
        store.get(session.id)
    status, detail = _status(exc)
    assert status == 410 and "expired (10 s without use)" in detail and len(store) == 0


def test_unknown_session_is_404():
    store = SessionStore(ttl_s=10, max_sessions=4)
    with pytest.raises(RequestError) as exc:
        store.get("nope")
    assert _status(exc)[0] == 404 and "'nope' is unknown" in _status(exc)[1]


def test_least_recently_used_session_is_evicted():
    store = SessionStore(ttl_s=100, max_sessions=2, clock=_Clock())
    a, b, c = (_session(store) for _ in range(3))
    store.add(a)
    store.add(b)
    store.get(a.id)  # a is now more recent than b
    store.add(c)
    assert store.get(a.id) is a and store.get(c.id) is c
    with pytest.raises(RequestError) as exc:
        store.get(b.id)
    assert _status(exc)[0] == 410 and "evicted" in _status(exc)[1]


def test_tool_pool_encodes_each_slice_once_per_slot():
    built = []

    def factory():
        built.append(FakeTool())
        return built[-1]

    pool = ToolPool(factory, size=2)
    one, two = SliceKey("a", None, 2), SliceKey("b", 3, 2)
    with pool.use(one, IMAGE) as (tool_a, encoded):
        assert encoded
    with pool.use(one, IMAGE) as (tool, encoded):
        assert tool is tool_a and not encoded
    with pool.use(two, IMAGE) as (tool_b, encoded):
        assert encoded and tool_b is not tool_a
    with pool.use(one, IMAGE) as (tool, encoded):  # both slices stay cached in a pool of two
        assert tool is tool_a and not encoded
    assert pool.encode_count == 2 and len(built) == 2


def test_a_pool_of_one_re_encodes_when_the_slice_changes():
    first = FakeTool()
    pool = ToolPool(lambda: pytest.fail("a pool of one with a first tool builds none"), size=1, first=first)
    keys = [SliceKey("a", None, 2), SliceKey("a", 4, 2), SliceKey("a", None, 2)]
    for key in keys:
        with pool.use(key, IMAGE) as (tool, encoded):
            assert tool is first and encoded
    with pool.use(keys[-1], IMAGE) as (tool, encoded):
        assert tool is first and not encoded
    assert first.encode_count == 3


def test_a_slot_held_by_a_volume_job_is_passed_over_while_another_is_free():
    pool = ToolPool(FakeTool, size=2)
    keys = [SliceKey("a", None, 2), SliceKey("b", None, 2), SliceKey("c", None, 2)]
    with pool.use(keys[0], IMAGE) as (first, _):
        pass
    got = []

    def requests_2d():  # each 2D request gets the free slot at once
        for key in keys:
            with pool.use(key, IMAGE) as (tool, _):
                got.append(tool)

    with pool.borrow() as held:  # the least recently used free slot: not the one holding slice a
        assert held is not first
        thread = threading.Thread(target=requests_2d, daemon=True)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive(), "a 2D request waited for the slot the volume job holds"
    assert got == [first] * 3
    with pool.use(keys[2], IMAGE) as (tool, encoded):
        assert tool is first and not encoded


def test_conf_values_are_parsed_and_checked():
    config = AppConfig.from_conf({"max_steps": "5", "model": "none", "session_ttl": "2.5", "server_mode": "true"})
    assert (config.max_steps, config.model, config.session_ttl, config.tool) == (5, None, 2.5, "classical")
    for conf, words in [
        ({"tool": "magic"}, "--conf tool 'magic' is invalid: expected one of classical"),
        ({"max_steps": "many"}, "--conf max_steps 'many' is invalid: expected an integer"),
        ({"max_steps": "0"}, "--conf max_steps 0 is invalid"),
        ({"modle": "x"}, "unknown --conf key 'modle'"),
        ({"checkpoint": "/no/such/weights.pt"}, "expected the path of an existing weights file"),
        ({"dialect": "klingon"}, "--conf dialect 'klingon' is invalid"),
    ]:
        with pytest.raises(ConfigError, match=words):
            AppConfig.from_conf(conf)


def test_server_conf_keys_are_the_spec_fields():
    config = AppConfig.from_conf({"tool_config": "vit_b", "sample": "true", "temperature": "0.7"})
    assert (config.tool_spec.tool_config, config.policy_spec.sample, config.policy_spec.temperature) == (
        "vit_b",
        True,
        0.7,
    )
    for conf, words in [({"sample": "yes"}, "expected true or false"), ({"top_p": "2"}, "--conf top_p 2.0 is invalid")]:
        with pytest.raises(ConfigError, match=words):
            AppConfig.from_conf(conf)
