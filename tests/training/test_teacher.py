"""The teacher-LLM path against a scripted OpenAI-compatible endpoint on loopback: retries, HTTP and body errors,
the leak filter with its fallback, instruction filtering, and the privileged image."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from ibisagent.simulator import next_click
from ibisagent_training.leaks import find_leaks
from ibisagent_training.reasoning import describe_step, step_context
from ibisagent_training.teacher import (
    TeacherClient,
    TeacherConnectionError,
    TeacherHTTPError,
    TeacherInstructions,
    TeacherReasoner,
    TeacherResponseError,
    clean_reasoning,
    privileged_view,
    reasoning_request,
)


def completion(text: str) -> tuple[int, str]:
    return 200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})


class FakeEndpoint:
    """A loopback server answering POST /v1/chat/completions from a script of (status, body) replies (the last
    one repeats); it records each request's path, headers and JSON body."""

    def __init__(self, script: list[tuple[int, str]], delay: float = 0.0):
        self.script, self.delay, self.requests = list(script), delay, []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                endpoint.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, text = endpoint.script.pop(0) if len(endpoint.script) > 1 else endpoint.script[0]
                if endpoint.delay:
                    time.sleep(endpoint.delay)
                if self.path != "/v1/chat/completions":
                    status, text = 404, '{"error": "not found"}'
                data = text.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the timeout test hangs up before the slow answer is written

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True  # a handler still sleeping (timeout test) must not block shutdown
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def client(url: str, **kwargs) -> TeacherClient:
    return TeacherClient(url, "teacher-model", **{"retries": 2, "backoff": 0.0, "timeout": 5.0, **kwargs})


def disk(cy, cx, r, size=(96, 96)):
    yy, xx = np.ogrid[: size[0], : size[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


@pytest.fixture
def ctx():
    gt = disk(48, 48, 25)
    mask = gt & (np.arange(96)[None, :] < 48)
    return step_context(mask, gt, [next_click(mask, gt, target="liver")], "liver", "CT", step=1)


GOOD = "The mask stops short of the liver's right edge, where the same tissue continues; I add a positive point there."
LEAK = "The red region shows a false positive; I add a positive point in the blue area."


# -- the client -----------------------------------------------------------------------------------------------------
def test_chat_sends_model_key_and_messages(monkeypatch):
    monkeypatch.setenv("TEACHER_KEY_FOR_TEST", "sk-test")
    with FakeEndpoint([completion("hello")]) as ep:
        c = client(ep.url + "/", api_key_env="TEACHER_KEY_FOR_TEST", max_tokens=64)
        assert c.chat([{"role": "user", "content": "hi"}], seed=3) == "hello"
    (req,) = ep.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["body"]["model"] == "teacher-model" and req["body"]["max_tokens"] == 64 and req["body"]["seed"] == 3
    assert req["body"]["messages"] == [{"role": "user", "content": "hi"}]


def test_no_key_no_header(monkeypatch):
    monkeypatch.delenv("TEACHER_KEY_FOR_TEST", raising=False)
    with FakeEndpoint([completion("ok")]) as ep:
        client(ep.url, api_key_env="TEACHER_KEY_FOR_TEST").chat([])
    assert "Authorization" not in ep.requests[0]["headers"]


def test_server_error_is_retried():
    with FakeEndpoint([(500, '{"error": "overloaded"}'), (503, "busy"), completion("fine")]) as ep:
        c = client(ep.url)
        assert c.chat([]) == "fine"
    assert len(ep.requests) == 3 and c.stats["retries"] == 2


def test_server_error_after_retries_names_url_and_status():
    with FakeEndpoint([(500, '{"error": "boom"}')]) as ep:
        with pytest.raises(TeacherHTTPError, match=r"HTTP 500.*boom.*after 2 attempts") as info:
            client(ep.url, retries=1).chat([])
    assert info.value.status == 500 and ep.url in str(info.value) and len(ep.requests) == 2


def test_client_errors_are_not_retried():
    with FakeEndpoint([completion("never")]) as ep:
        with pytest.raises(TeacherHTTPError, match="check the base URL") as info:
            client(ep.url.replace("/v1", "/wrong")).chat([])
    assert info.value.status == 404 and len(ep.requests) == 1
    with FakeEndpoint([(401, '{"error": "no key"}')]) as ep:
        with pytest.raises(TeacherHTTPError, match=r"HTTP 401.*API key"):
            client(ep.url).chat([])
    assert len(ep.requests) == 1


@pytest.mark.parametrize(
    "body, message",
    [("this is not json", "not JSON"), ('{"choices": []}', "without choices"), ('{"result": 1}', "without choices")],
)
def test_bad_bodies(body, message):
    with FakeEndpoint([(200, body)]) as ep:
        with pytest.raises(TeacherResponseError, match=message):
            client(ep.url, retries=1).chat([])
    assert len(ep.requests) == 2  # a malformed body is retried too


def test_unreachable_url_and_timeout():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(TeacherConnectionError, match=rf"cannot reach the teacher endpoint {url}/chat/completions"):
        client(url, retries=1).chat([])
    with FakeEndpoint([completion("late")], delay=0.6) as ep:
        with pytest.raises(TeacherConnectionError, match="timed out"):
            client(ep.url, retries=0, timeout=0.2).chat([])
    with pytest.raises(ValueError, match="not an http"):
        TeacherClient("localhost:8000", "m")


# -- reasoning ------------------------------------------------------------------------------------------------------
def test_request_holds_the_facts(ctx):
    text = reasoning_request(ctx)
    assert "Target: liver" in text and "Positive point" in text and "right side" in text
    assert "50%" in text or "49%" in text or "51%" in text  # the share of the target the mask covers


def test_leaking_reply_is_asked_again(ctx):
    with FakeEndpoint([completion(LEAK), completion(GOOD)]) as ep:
        reasoner = TeacherReasoner(client(ep.url), attempts=2)
        assert reasoner(ctx, random.Random(0)) == GOOD
    assert reasoner.stats["leaks"] == 1 and reasoner.stats["accepted"] == 1 and reasoner.stats["fallbacks"] == 0
    system = ep.requests[0]["body"]["messages"][0]["content"]
    assert "ONLY SEES ONE THING" in system and "Ground Truth" not in system.split("Forbidden words:")[0]


def test_500_then_leak_then_good(ctx):
    with FakeEndpoint([(500, "oops"), completion(LEAK), completion(GOOD)]) as ep:
        reasoner = TeacherReasoner(client(ep.url), attempts=2)
        assert reasoner(ctx, random.Random(0)) == GOOD
    assert len(ep.requests) == 3 and reasoner.stats["leaks"] == 1 and reasoner.stats["errors"] == 0


def test_always_leaking_falls_back_to_the_default_generator(ctx):
    with FakeEndpoint([completion(LEAK)]) as ep:
        reasoner = TeacherReasoner(client(ep.url), attempts=3)
        texts = [reasoner(ctx, random.Random(5)) for _ in range(2)]
    assert texts == [describe_step(ctx, random.Random(5))] * 2
    assert not find_leaks(texts[0])
    assert reasoner.stats["fallbacks"] == 2 and reasoner.stats["leaks"] == 6 and len(ep.requests) == 6
    assert reasoner.report() == "teacher reasoning: 0/2 accepted, 2 fallbacks (6 leaks, 0 malformed, 0 errors)"


def test_malformed_replies_fall_back(ctx):
    with FakeEndpoint([completion(""), completion("<action>Terminate</action>")]) as ep:
        reasoner = TeacherReasoner(client(ep.url), attempts=2)
        assert reasoner(ctx, random.Random(1)) == describe_step(ctx, random.Random(1))
    assert reasoner.stats["malformed"] == 2 and reasoner.stats["fallbacks"] == 1


def test_endpoint_failure_falls_back_or_raises(ctx):
    with FakeEndpoint([(500, "down")]) as ep:
        reasoner = TeacherReasoner(client(ep.url, retries=1))
        assert reasoner(ctx, random.Random(2)) == describe_step(ctx, random.Random(2))
        assert reasoner.stats["errors"] == 1 and reasoner.stats["fallbacks"] == 1
        with pytest.raises(TeacherHTTPError):
            TeacherReasoner(client(ep.url, retries=0), on_error="raise")(ctx, random.Random(2))


def test_privileged_image_is_sent(ctx):
    image = np.full((96, 96, 3), 90, np.uint8)
    view = privileged_view(image, ctx.mask, ctx.gt, ctx.clicks)
    assert view.shape == (96, 96, 3) and view.dtype == np.uint8
    tp, fn = ctx.mask & ctx.gt, ctx.gt & ~ctx.mask
    assert view[tp][:, 1].mean() > view[tp][:, 0].mean()  # correct area tinted green
    assert view[fn][:, 2].mean() > view[fn][:, 1].mean()  # missed area tinted blue
    with FakeEndpoint([completion(GOOD)]) as ep:
        assert TeacherReasoner(client(ep.url))(ctx, random.Random(0), image=image) == GOOD
    content = ep.requests[0]["body"]["messages"][1]["content"]
    assert content[0]["type"] == "image_url" and content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[1]["type"] == "text" and "Target: liver" in content[1]["text"]


def test_clean_reasoning():
    assert clean_reasoning(f"<think>\n{GOOD}\n</think>") == GOOD
    assert clean_reasoning(f'"{GOOD}"') == GOOD
    assert clean_reasoning("   ") is None
    assert clean_reasoning("One. Two. Three. Four. Five.") is None
    assert clean_reasoning("x" * 900) is None


# -- instructions ---------------------------------------------------------------------------------------------------
def test_instructions_are_filtered():
    items = [
        "Please segment the liver tumor in this CT scan.",
        "Outline the liver tumor on the red channel.",  # leak
        "Count the lesions.",  # no target, unsupported
        "How many liver tumor foci are there? Segment the liver tumor.",  # unsupported
        "please segment the liver tumor in this CT scan.",  # duplicate
        42,
        "Can you delineate the liver tumor?",
    ]
    reply = "Here you go:\n```json\n" + json.dumps(items) + "\n```"
    with FakeEndpoint(
        [completion(reply), completion("not a list"), completion(json.dumps(["Mask the liver tumor."]))]
    ) as ep:
        gen = TeacherInstructions(client(ep.url), max_calls=3)
        prompts = gen.generate("liver tumor", "CT", n=3, family="direct", rng=random.Random(0))
    assert [p.text for p in prompts] == [
        "Please segment the liver tumor in this CT scan.",
        "Can you delineate the liver tumor?",
        "Mask the liver tumor.",
    ]
    assert all(p.family == "direct" for p in prompts)
    s = gen.stats
    assert (s["calls"], s["malformed"], s["rejected_leak"], s["rejected_duplicate"]) == (3, 1, 1, 1)
    assert s["rejected_unsupported"] == 1 and s["rejected_missing_target"] == 1 and s["rejected_not_text"] == 1
    system, user = (m["content"] for m in ep.requests[0]["body"]["messages"])
    assert "a CT scan that contains a liver tumor" in system and "'liver tumor'" in system
    assert "direct command" in user and "Examples:" in user and "(3 of them)" in user
    assert "(1 of them)" in ep.requests[1]["body"]["messages"][1]["content"]
    with pytest.raises(ValueError, match="initial family"):
        gen.generate("liver tumor", "CT", family="poetic")
