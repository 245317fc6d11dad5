"""Hardening, params and sessions: clicks per request and steps per session are bounded, refused requests store no
session and evict none, text that is not valid UTF-8 and numbers of thousands of digits get a short 400, and the
server's memory stays bounded under a burst of such requests."""

from __future__ import annotations

import pytest

from tests.monailabel_app.attack import HEART, LIVER, infer, rss_mb

pytest.importorskip("monailabel")


def _new(server, **params):
    response = infer(server, HEART, {"instruction": "segment the heart", "run_agent": False, **params})
    assert response.status_code == 200, response.text
    return response.json()


def test_clicks_per_request_are_bounded(attack):
    points = [[i + 1, 5] for i in range(17)]  # the server takes 16
    response = infer(attack["server"], params={"instruction": "x", "foreground": points, "run_agent": False})
    assert response.status_code == 400 and "at most 16" in response.json()["detail"]


def test_steps_per_session_are_bounded(attack):
    server = attack["server"]
    sid = _new(server, foreground=[[100, 100]])["session_id"]
    for i in range(5):
        _new(server, session_id=sid, foreground=[[110 + i, 100]])
    response = infer(server, HEART, {"session_id": sid, "foreground": [[200, 200]], "run_agent": False})
    assert response.status_code == 400 and "reached 6 steps" in response.json()["detail"]
    back = _new(server, session_id=sid, undo_to=2, foreground=[[200, 200]])
    assert len(back["trajectory"]["steps"]) == 3


def test_refused_requests_store_no_session_and_evict_none(attack):
    server = attack["server"]
    sessions = [_new(server, foreground=[[100 + 10 * i, 100]])["session_id"] for i in range(4)]  # max_sessions 4
    refused = [
        {"instruction": "x", "foreground": [[5000, 5]]},
        {"instruction": "x", "slice": 3},
        {"instruction": "x", "foreground": [[5, 5]], "max_steps": 0},
    ]
    for params in refused * 4:
        assert infer(server, LIVER, {**params, "run_agent": False}).status_code == 400
    raw = '{"instruction": "segment \\ud800", "foreground": [[5, 5]], "run_agent": false}'
    assert infer(server, LIVER, raw).status_code == 400
    for sid in sessions:
        _new(server, session_id=sid, foreground=[[50, 50]])


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ('{"instruction": "segment \\ud800"}', "not valid UTF-8"),
        ('{"instruction": "x", "target": "\\udfff"}', "not valid UTF-8"),
        ('{"label": "\\ud83d"}', "not valid UTF-8"),
        ('{"\\ud800": 1}', "not valid UTF-8"),
        ('{"instruction": "x", "slice": ' + "9" * 4299 + "}", "has 4299 digits"),
        ('{"instruction": "x", "undo_to": -' + "9" * 40 + "}", "out of range"),
    ],
)
def test_bad_text_and_huge_numbers_get_a_short_400(attack, raw, words):
    response = infer(attack["server"], LIVER, raw)
    assert response.status_code == 400 and words in response.json()["detail"]
    assert len(response.text) < 400


def test_memory_stays_bounded_under_a_burst_of_requests(attack):
    server = attack["server"]
    before = rss_mb(server)
    points = [[i * 7 % 1000 + 1, i * 13 % 1000 + 1] for i in range(16)]
    for _ in range(3):
        sid = _new(server, foreground=points)["session_id"]
        for _ in range(5):
            _new(server, session_id=sid, background=points[:8])
    for _ in range(20):
        infer(server, LIVER, '{"instruction": "' + "x" * 3000 + '"}')
    grown = rss_mb(server) - before
    assert grown < 300, f"the server grew by {grown:.0f} MB"
