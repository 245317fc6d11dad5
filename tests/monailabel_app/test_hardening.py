"""Hardening of the MONAI Label app (issue #5) over HTTP: 50 concurrent agent requests and continuations with no lost
or mixed-up session, and every kind of bad request answered 4xx with a message that names what was wrong, with no file
read or written outside the studies folder.

One agent server (tiny random Qwen2.5-VL + the tool, 64 sessions) serves the module; the harness is test_server.py's.
Files outside the studies folder that a path trick would reach are planted as canaries: their access time is set to
0 and must stay there (reading a file updates it on relatime/strictatime mounts; checked before relying on it).
"""

from __future__ import annotations

import io
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DEMO, RECIST
from tests.monailabel_app.test_server import (
    HEART,
    LIVER,
    TOOL,
    VOLUME,
    _all,
    _build_studies,
    _check_result,
    _png,
    _Server,
)

requests = pytest.importorskip("requests")
nib = pytest.importorskip("nibabel")

from PIL import Image  # noqa: E402

from ibisagent.trajectory import STOP_REASONS, Trajectory  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (DEMO.is_dir() and RECIST.is_dir()), reason=f"shared data not found at {DEMO.parent} / {RECIST}"
)

N_CONCURRENT = 50
SIDE = 1024  # the demo PNGs are 1024 x 1024
CANARIES = ("secret.png", f"outside/{LIVER}.png")  # read by no request


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardening")
    studies = tmp / "studies"
    data = _build_studies(studies)
    # files outside the studies folder: beside it (the server's working directory), in a sibling folder, and the
    # target of a study that is a link (as scripts/serve.sh builds the studies)
    (tmp / "outside").mkdir()
    heart = (studies / f"{HEART}.png").read_bytes()
    for name in (*CANARIES, "linked_target.png"):
        (tmp / name).write_bytes(heart)
    (studies / "linked.png").symlink_to(tmp / "linked_target.png")  # may be read, never written
    from ibisagent.testing import build_tiny_qwen2_5_vl

    build_tiny_qwen2_5_vl(tmp / "tiny-vlm")
    conf = {"model": str(tmp / "tiny-vlm"), "tool": TOOL, "max_new_tokens": "24", "max_sessions": "64"}
    server = _Server("agent", studies, tmp, conf)
    try:
        server.wait_ready()
        for name in CANARIES:
            os.utime(tmp / name, (0, (tmp / name).stat().st_mtime))
        yield {"server": server, "tmp": tmp, "studies": studies, "before": _outside_files(tmp), **data}
    finally:
        server.stop()


def _outside_files(tmp: Path) -> dict[str, int]:
    """Files under the module's folder outside the studies, with their mtimes (the server's own log and MONAI
    Label's upload-session folder excepted)."""
    skip = ("studies", "tiny-vlm", "agent-monailabel-sessions", "agent.log")
    return {
        str(p.relative_to(tmp)): p.stat().st_mtime_ns
        for p in tmp.rglob("*")
        if p.is_file() and not p.is_symlink() and p.relative_to(tmp).parts[0] not in skip
    }


def _post(server: _Server, params=None, image=LIVER, output="json", raw=None, files=None, url=None, query=None):
    """POST /infer/ibisagent; `raw` is the params field as sent, `url` a path and query string sent verbatim."""
    data = {"params": raw if raw is not None else json.dumps(params or {})}
    if url is not None:
        return requests.post(server.url + url, data=data, files=files, timeout=300)
    query = {"image": image, "output": output} if query is None else query
    return requests.post(f"{server.url}/infer/ibisagent", params=query, data=data, files=files, timeout=300)


# -- 50 concurrent requests ----------------------------------------------------------------------------------------
def _plan(i: int, env: dict) -> tuple[str, dict, tuple[int, int]]:
    """Request i: an image, an instruction and a click of its own, so that any mix-up shows in the answer."""
    image = (HEART, LIVER, VOLUME)[i % 3]
    x, y = 100 + 7 * i, 60 + 8 * i
    params = {"instruction": f"segment structure {i}", "max_steps": 2, "foreground": [[x, y]]}
    if image == VOLUME:
        k = env["lesion_slice"]
        params.update(slice=k, foreground=[[x, y, k]])
    return image, params, (x, y)


def _burst(n: int, send) -> tuple[list, list[float], float]:
    """Send n requests from n threads released together: (responses, seconds per request, wall seconds)."""
    start = threading.Barrier(n)

    def one(i):
        start.wait()
        t0 = time.perf_counter()
        response = send(i)
        return response, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    return [r for r, _ in results], [s for _, s in results], time.perf_counter() - t0


def _label_mask(label: bytes, name: str, env: dict, tmp_path: Path, index: int) -> np.ndarray:
    if name.endswith(".png"):
        return np.asarray(Image.open(io.BytesIO(label))) > 0
    path = tmp_path / f"label{index}.nii.gz"
    path.write_bytes(label)
    data = np.asanyarray(nib.load(path).dataobj)
    assert data.shape == env["volume_shape"]
    return data[:, :, env["lesion_slice"]].T > 0


def test_concurrent_agent_requests_keep_their_sessions_apart(env, tmp_path):
    server = env["server"]
    plans = [_plan(i, env) for i in range(N_CONCURRENT)]

    # 1. 50 new sessions with the agent at once: each answer is its own request's, complete and well formed
    responses, seconds, wall = _burst(N_CONCURRENT, lambda i: _post(server, plans[i][1], plans[i][0], "all"))
    sessions, server_seconds = {}, []
    for i, (response, (image, params, click)) in enumerate(zip(responses, plans)):
        result, label, name = _all(response)
        trajectory = _check_result(result, image)
        assert trajectory.instruction == params["instruction"] and trajectory.targets == [f"structure {i}"]
        assert result["stop_reason"] in STOP_REASONS and trajectory.stop_reason == result["stop_reason"]
        assert 2 <= len(trajectory.steps) <= 3 and trajectory.meta["user_steps"] == [0]
        (user_click,) = trajectory.steps[0].action.clicks
        assert (user_click.x, user_click.y, user_click.positive) == (*click, True)
        assert np.array_equal(_label_mask(label, name, env, tmp_path, i), trajectory.final_mask)
        sessions[result["session_id"]] = i
        server_seconds.append(trajectory.meta["server"]["request_seconds"])
    assert len(sessions) == N_CONCURRENT  # 50 distinct sessions
    print(
        f"\n{N_CONCURRENT} concurrent agent requests: wall {wall:.1f} s, per request (client) median "
        f"{statistics.median(seconds):.2f} s max {max(seconds):.2f} s, server time per request mean "
        f"{statistics.mean(server_seconds):.3f} s max {max(server_seconds):.3f} s"
    )

    # 2. 50 continuations at once, one per session: each adds its own negative click to its own session
    ids = list(sessions)

    def continuation(j):
        i = sessions[ids[j]]
        return _post(server, {"session_id": ids[j], "background": [[5 + i, 7 + i]], "run_agent": False}, plans[i][0])

    responses, seconds, wall = _burst(N_CONCURRENT, continuation)
    for j, response in enumerate(responses):
        assert response.status_code == 200, response.text[:1000]
        result, i = response.json(), sessions[ids[j]]
        assert result["session_id"] == ids[j] and result["stop_reason"] == "agent_not_run"
        trajectory = Trajectory.from_dict(result["trajectory"])
        assert trajectory.instruction == f"segment structure {i}"
        last = trajectory.steps[-1]
        assert last.index in trajectory.meta["user_steps"] and len(trajectory.meta["user_steps"]) == 2
        assert [(c.x, c.y, c.positive) for c in last.action.clicks] == [(5 + i, 7 + i, False)]
        clicks = [(c.x, c.y, c.positive) for c in last.clicks[f"structure {i}"]]
        assert clicks[0] == (*plans[i][2], True) and clicks[-1] == (5 + i, 7 + i, False)
    print(f"{N_CONCURRENT} concurrent continuations: wall {wall:.1f} s, median {statistics.median(seconds):.2f} s")

    # 3. ten requests on one session at once: they take turns, and none of their clicks is lost
    sid, i = ids[0], sessions[ids[0]]
    image = plans[i][0]
    extra = [(300.0 + 3 * j, 400.0) for j in range(10)]

    def same_session(j):
        return _post(server, {"session_id": sid, "foreground": [extra[j]], "run_agent": False}, image)

    responses, _, _ = _burst(10, same_session)
    assert [r.status_code for r in responses] == [200] * 10, [r.text[:300] for r in responses if r.status_code != 200]
    final = Trajectory.from_dict(_post(server, {"session_id": sid, "run_agent": False}, image).json()["trajectory"])
    added = [(c.x, c.y) for c in final.steps[-1].clicks[f"structure {i}"] if (c.x, c.y) in extra and c.positive]
    assert sorted(added) == extra and len(final.meta["user_steps"]) == 12

    assert server.proc.poll() is None and requests.get(server.url + "/info/", timeout=30).status_code == 200


# -- bad requests -----------------------------------------------------------------------------------------------------
DEEP = "[" * 30_000 + "]" * 30_000  # within the params size bound, beyond the JSON reader's recursion
BIG = "9" * 400  # beyond float range, within JSON's 4300 digits
ANSWERED = [
    # (id, keyword arguments of _post ("{tmp}" becomes the module's folder), status, words the message must contain)
    # malformed params
    ("params not JSON", {"raw": "{not json"}, 400, "params is not valid JSON"),
    ("params truncated", {"raw": '{"instruction": "x"'}, 400, "params is not valid JSON"),
    ("params trailing text", {"raw": '{"instruction": "x"} and more'}, 400, "params is not valid JSON"),
    ("params nested 100000 deep", {"raw": DEEP}, 400, "params nests too deeply"),
    ("params integer of 5000 digits", {"raw": '{"slice": ' + "9" * 5000 + "}"}, 400, "params cannot be read"),
    ("params null", {"raw": "null"}, 400, "params must be a JSON object"),
    ("params a string", {"raw": '"segment the liver"'}, 400, "params must be a JSON object"),
    ("params a list", {"raw": "[1, 2]"}, 400, "params must be a JSON object"),
    # unknown task or model
    ("unknown model in the URL", {"url": f"/infer/magic?image={LIVER}"}, 404, "unknown model 'magic'"),
    ("model in params", {"params": {"instruction": "x", "model": "other"}}, 400, "params.model is set by the server"),
    ("model of the wrong type", {"params": {"instruction": "x", "model": ["ibisagent"]}}, 400, "params.model is"),
    ("model path in the URL", {"url": f"/infer/..%2F..%2Fetc?image={LIVER}"}, 404, "is not served"),
    ("params too long", {"raw": json.dumps({"instruction": "x" * 70_000})}, 400, "at most 65536 are accepted"),
    # missing image
    ("no image", {"params": {"instruction": "x"}, "query": {"output": "json"}}, 400, "names no image"),
    ("empty image", {"params": {"instruction": "x"}, "image": ""}, 400, "names no image"),
    ("image null in params", {"params": {"instruction": "x", "image": None}}, 400, "params.image is set by the"),
    # image ids with path tricks: never a path, never read
    ("image ../../etc/passwd", {"params": {"instruction": "x"}, "image": "../../etc/passwd"}, 404, "unknown image"),
    ("image /etc/passwd", {"params": {"instruction": "x"}, "image": "/etc/passwd"}, 404, "unknown image id"),
    ("image absolute canary", {"params": {"instruction": "x"}, "image": "{tmp}/secret.png"}, 404, "unknown image"),
    ("image absolute, no suffix", {"params": {"instruction": "x"}, "image": "{tmp}/secret"}, 404, "unknown image"),
    ("image ../secret", {"params": {"instruction": "x"}, "image": "../secret"}, 404, "unknown image id '../secret'"),
    ("image ../outside/id", {"params": {"instruction": "x"}, "image": f"../outside/{LIVER}"}, 404, "unknown image"),
    ("image id/../..", {"params": {"instruction": "x"}, "image": f"{LIVER}/../../secret"}, 404, "unknown image"),
    ("image ..\\secret", {"params": {"instruction": "x"}, "image": "..\\secret"}, 404, "unknown image id"),
    ("image ~", {"params": {"instruction": "x"}, "image": "~/secret"}, 404, "unknown image id"),
    ("image file URL", {"params": {"instruction": "x"}, "image": "file://{tmp}/secret.png"}, 404, "unknown image"),
    ("image with suffix", {"params": {"instruction": "x"}, "image": f"{LIVER}.png"}, 404, "unknown image id"),
    ("image with NUL", {"params": {"instruction": "x"}, "image": f"{LIVER}\0.png"}, 404, "unknown image id"),
    ("image URL-encoded", {"url": "/infer/ibisagent?image=..%2F..%2Fetc%2Fpasswd"}, 404, "'../../etc/passwd'"),
    ("image URL-encoded canary", {"url": "/infer/ibisagent?image=..%2Fsecret"}, 404, "unknown image id '../secret'"),
    ("image double-encoded", {"url": "/infer/ibisagent?image=..%252Fsecret"}, 404, "unknown image id '..%2Fsecret'"),
    ("image in params", {"params": {"instruction": "x", "image": "{tmp}/secret.png"}}, 400, "params.image is set by"),
    ("image list in params", {"params": {"instruction": "x", "image": ["{tmp}/secret.png"]}}, 400, "params.image"),
    ("upload path in params", {"params": {"ibisagent_label_upload": "{tmp}/secret.png"}}, 400, "set by the server"),
    ("image of a session, id a path", {"params": {"session_id": "../../etc/passwd"}}, 404, "is unknown"),
    # out-of-range clicks
    ("click at x = width", {"params": {"instruction": "x", "foreground": [[SIDE, 5]]}}, 400, "outside the image"),
    ("click at y = height", {"params": {"instruction": "x", "foreground": [[5, SIDE]]}}, 400, "outside the image"),
    ("negative click", {"params": {"instruction": "x", "background": [[-0.5, 5]]}}, 400, "background[0]"),
    ("click at 1e400", {"raw": '{"instruction": "x", "foreground": [[1e400, 5]]}'}, 400, "foreground[0] must be"),
    ("click at NaN", {"raw": '{"instruction": "x", "foreground": [[NaN, 5]]}'}, 400, "foreground[0] must be"),
    ("click of 400 digits", {"raw": '{"instruction": "x", "foreground": [[' + BIG + ", 5]]}"}, 400, "foreground[0]"),
    (
        "volume click at k = 400 digits",
        {"raw": '{"instruction": "x", "foreground": [[1, 2, ' + BIG + "]]}", "image": VOLUME},
        400,
        "foreground[0] must be",
    ),
    (
        "volume click, k = 1e300",
        {"raw": '{"instruction": "x", "foreground": [[1, 2, 1e300]]}', "image": VOLUME},
        400,
        "is out of range",
    ),
    (
        "volume click off its slice, nothing else to do",
        {"params": {"instruction": "x", "slice": 3, "foreground": [[9, 9, 4]], "run_agent": False}, "image": VOLUME},
        400,
        "lie on other slices: slice 4 of axis 2",
    ),
    ("point of four numbers", {"params": {"instruction": "x", "foreground": [[1, 2, 0, 0]]}}, 400, "foreground[0]"),
    ("257 points", {"params": {"instruction": "x", "foreground": [[1, 2]] * 257}}, 400, "at most 256 points"),
    ("slice out of range", {"params": {"instruction": "x", "slice": -1}, "image": VOLUME}, 400, "slice=-1 is out"),
    ("axis 3", {"params": {"instruction": "x", "axis": 3, "slice": 0}, "image": VOLUME}, 400, "axis must be 0, 1"),
    ("max_steps 0", {"params": {"instruction": "x", "max_steps": 0}}, 400, "params.max_steps=0 is out of range"),
    # wrong types
    ("instruction a list", {"params": {"instruction": ["x"]}}, 400, "params.instruction must be a string"),
    ("instruction a number", {"params": {"instruction": 5}}, 400, "params.instruction must be a string"),
    ("max_steps a string", {"params": {"instruction": "x", "max_steps": "3"}}, 400, "max_steps must be an integer"),
    ("max_steps 2.5", {"params": {"instruction": "x", "max_steps": 2.5}}, 400, "max_steps must be an integer"),
    ("max_steps true", {"params": {"instruction": "x", "max_steps": True}}, 400, "max_steps must be an integer"),
    ("slice a string", {"params": {"instruction": "x", "slice": "3"}, "image": VOLUME}, 400, "slice must be an int"),
    ("axis a string", {"params": {"instruction": "x", "axis": "z"}, "image": VOLUME}, 400, "axis must be an integer"),
    ("foreground an object", {"params": {"instruction": "x", "foreground": {"x": 1}}}, 400, "must be a list"),
    ("foreground a string", {"params": {"instruction": "x", "foreground": "1,2"}}, 400, "must be a list"),
    ("foreground nested", {"params": {"instruction": "x", "foreground": [[[1], 2]]}}, 400, "foreground[0] must be"),
    ("foreground booleans", {"params": {"instruction": "x", "foreground": [[True, 2]]}}, 400, "foreground[0] must"),
    ("run_agent a string", {"params": {"instruction": "x", "run_agent": "yes"}}, 400, "run_agent must be true or"),
    ("run_agent 1", {"params": {"instruction": "x", "run_agent": 1}}, 400, "run_agent must be true or false"),
    ("session_id a number", {"params": {"session_id": 5}}, 400, "params.session_id must be a session id string"),
    ("target a number", {"params": {"instruction": "x", "target": 5}}, 400, "params.target must be a non-empty"),
    ("undo_to a string", {"params": {"instruction": "x", "undo_to": "a"}}, 400, "params.undo_to must be an integer"),
    ("remove_clicks a string", {"params": {"instruction": "x", "remove_clicks": "a"}}, 400, "remove_clicks must be"),
    ("label a list", {"params": {"instruction": "x", "label": [1]}}, 400, "params.label must be a segment name"),
    (
        "label_tag a path",
        {"params": {"instruction": "x", "save_label": True, "label_tag": "../../x", "run_agent": False}},
        400,
        "params.label_tag '../../x' must be a plain name",
    ),
    ("undo_to without a session", {"params": {"instruction": "x", "undo_to": 0}}, 400, "need a session"),
    # oversized text for the model's prompt
    ("instruction of 10000 characters", {"params": {"instruction": "x" * 10_000}}, 400, "is 10000 characters"),
    ("target of 1000 characters", {"params": {"instruction": "x", "target": "t" * 1000}}, 400, "at most 200"),
    ("label name of 1000 characters", {"params": {"label": "t" * 1000}}, 400, "params.label is 1000 characters"),
    # uploads and outputs MONAI Label handles before or after the task
    (
        "label upload with a 300-character name",
        {"params": {"instruction": "x"}, "files": {"label": ("m." + "b" * 300, b"x", "image/png")}},
        400,
        "name is too long",
    ),
    (
        ".bin label for a path",
        {"params": {"instruction": "x"}, "image": "../secret", "files": {"label": ("m.bin", b"x", "application/x")}},
        400,
        "the .bin label upload cannot be converted",
    ),
    (
        ".bin label of the wrong size",
        {"params": {"instruction": "x"}, "files": {"label": ("m.bin", b"xx", "application/octet-stream")}},
        400,
        "the .bin label upload cannot be converted",
    ),
    (
        "output=dicom_seg",
        {"params": {"instruction": "x", "foreground": [[5, 5]], "run_agent": False}, "output": "dicom_seg"},
        400,
        "output=dicom_seg needs a DICOMweb datastore",
    ),
    ("output=xml", {"params": {"instruction": "x"}, "output": "xml"}, 422, "'image', 'json', 'all' or 'dicom_seg'"),
    (
        "image upload instead of an id",
        {"params": {"instruction": "x"}, "query": {}, "files": {"file": ("a.png", b"x", "image/png")}},
        404,
        "unknown image id",
    ),
]


def _fill(value, tmp: Path):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, tmp) for v in value]
    return value


@pytest.mark.parametrize("kwargs, status, words", [c[1:] for c in ANSWERED], ids=[c[0] for c in ANSWERED])
def test_bad_request_is_answered_4xx_with_a_message(env, kwargs, status, words):
    kwargs = {k: v if k == "files" else _fill(v, env["tmp"]) for k, v in kwargs.items()}
    words = _fill(words, env["tmp"])
    response = _post(env["server"], **kwargs)
    assert response.status_code == status, response.text[:1000]
    detail = response.json()["detail"]
    assert words in str(detail), detail
    assert len(str(detail)) < 1000  # the message quotes the value, it does not echo the request


def test_a_path_as_label_name_is_a_name_and_never_read(env):
    """Slicer's stock module sends the segment's name under `label`: a path there names the target, nothing more."""
    path = str(env["tmp"] / "secret.png")
    result = _post(env["server"], {"label": path, "foreground": [[5, 5]], "run_agent": False}).json()
    trajectory = Trajectory.from_dict(result["trajectory"])
    assert trajectory.targets == [path] and trajectory.initial_masks == {}


DATASTORE_WRITES = [
    # (id, method, path, query, upload field, status, words): MONAI Label's own datastore endpoints
    ("image id ../", "PUT", "/datastore/image", {"image": "../escaped"}, "file", 400, "must be a plain name"),
    ("image id absolute", "PUT", "/datastore/image", {"image": "{tmp}/abs_escaped"}, "file", 400, "plain name"),
    ("image id ..", "PUT", "/datastore/image", {"image": ".."}, "file", 400, "image '..' must be a plain name"),
    ("image id of a linked study", "PUT", "/datastore/image", {"image": "linked"}, "file", 400, "links outside"),
    ("label tag ../", "PUT", "/datastore/label", {"image": LIVER, "tag": "../../escaped"}, "label", 400, "tag"),
    ("label of an unknown image", "PUT", "/datastore/label", {"image": "../secret"}, "label", 404, "unknown image"),
    ("download ../", "GET", "/datastore/image", {"image": "../secret"}, None, 404, "unknown image id '../secret'"),
    ("download absolute", "GET", "/datastore/image", {"image": "{tmp}/secret.png"}, None, 404, "unknown image id"),
]


@pytest.mark.parametrize(
    "method, path, query, upload, status, words",
    [c[1:] for c in DATASTORE_WRITES],
    ids=[c[0] for c in DATASTORE_WRITES],
)
def test_datastore_paths_stay_in_the_studies_folder(env, method, path, query, upload, status, words):
    files = {upload: ("x.png", _png(np.ones((8, 8), bool)), "image/png")} if upload else None
    response = requests.request(
        method, env["server"].url + path, params=_fill(query, env["tmp"]), files=files, timeout=60
    )
    assert response.status_code == status, response.text[:1000]
    assert words in response.json()["detail"]


def test_a_plain_upload_and_a_linked_study_still_work(env):
    """The checks leave the normal paths alone: an upload under a plain id (the Slicer module's), and inference on a
    study that links to a file elsewhere (read, never written)."""
    server = env["server"]
    files = {"file": ("x.png", _png(np.ones((16, 16), bool)), "image/png")}
    response = requests.put(server.url + "/datastore/image", params={"image": "slicer-upload-1"}, files=files)
    assert response.status_code == 200 and (env["studies"] / "slicer-upload-1.png").is_file()
    ok = _post(server, {"instruction": "x", "foreground": [[5, 5]], "run_agent": False}, image="linked")
    assert ok.status_code == 200, ok.text[:500]


def test_nothing_outside_the_studies_was_read_or_written(env):
    """Runs after the requests above: the canaries were never read, no file outside the studies folder appeared or
    changed, and the server is still up."""
    tmp = env["tmp"]
    probe = tmp / "atime-probe"
    probe.write_text("x")
    os.utime(probe, (0, probe.stat().st_mtime))
    probe.read_text()
    if probe.stat().st_atime == 0:
        pytest.skip("this file system does not record access times (noatime): reads cannot be seen")
    probe.unlink()
    read = [name for name in CANARIES if (tmp / name).stat().st_atime != 0]
    assert not read, f"files outside the studies folder were read: {read}"
    assert _outside_files(tmp) == env["before"]
    server = env["server"]
    assert server.proc.poll() is None and requests.get(server.url + "/info/", timeout=30).status_code == 200
