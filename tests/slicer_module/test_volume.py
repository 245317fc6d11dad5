"""IBISAgentLib.volume and the client's volume calls, without the server: the volume request's checks, the result
summary and "volume-1" record readers on good, malformed and hostile input (a 2D answer and other schema versions
refused with a message), the progress report, and the client's progress poll and task choice against a small local
HTTP server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from IBISAgentLib import client as c
from IBISAgentLib import encode_rle
from IBISAgentLib import volume as v

DIMS = (40, 30, 20)  # (I, J, K)


def summary(**over) -> dict:
    d = {
        "schema": "volume-1",
        "session_id": "abc123",
        "image": "ct",
        "axis": 2,
        "key_slice": 9,
        "range": [5, 12],
        "slices": [
            {"index": 9, "status": "key", "source": "user", "score": 1.0, "flagged": False, "reasons": [], "area": 30},
            {
                "index": 10,
                "status": "propagated",
                "source": "propagation",
                "score": 0.4,
                "flagged": True,
                "reasons": ["area jump"],
                "reviewed": False,
                "area": 80,
            },
            {"index": 8, "status": "propagated", "source": "propagation", "score": 0.9, "flagged": False, "area": 25},
            {"index": 11, "status": "absent", "source": "propagation", "score": 0.1, "flagged": False, "area": 0},
        ],
        "flagged": [10],
        "repairs_used": 0,
        "repair_budget": 3,
        "changed": [8, 9, 10, 11],
        "ignored_points": [],
        "stop_reason": "object ended",
        "seconds": 1.5,
    }
    d.update(over)
    return d


def test_a_summary_is_read_in_slice_order():
    r = v.VolumeResult.from_dict(summary(), num_slices=DIMS[2])
    assert r.indices == [8, 9, 10, 11] and r.flagged == [10] and r.range == (5, 12) and r.key_slice == 9
    assert r.status(10).flagged and r.status(10).reasons == ("area jump",) and r.status(3) is None
    assert "FLAGGED: area jump" in r.status(10).describe() and "key" in r.status(9).describe()
    assert v.VolumeResult.from_json(json.dumps(summary())).session_id == "abc123"


def test_the_trajectories_of_key_and_repaired_slices_are_read_and_checked():
    t = {"version": "1", "image_size": [30, 40], "steps": [{"index": 0, "text": "<think>x</think>", "masks": {}}]}
    r = v.VolumeResult.from_dict(summary(trajectories={"9": t}))
    assert r.trajectories[9].image_size == (30, 40) and r.trajectories[9].num_steps == 1
    for bad in ({"3": t}, {"nine": t}, {"9": {"version": "1", "image_size": [0, 4]}}, [t], {"9": {"version": "2"}}):
        with pytest.raises(v.VolumeFormatError):
            v.VolumeResult.from_dict(summary(trajectories=bad))


def test_a_2d_answer_and_other_schemas_are_refused_with_a_message():
    two_d = {"session_id": "s", "trajectory": {"version": "1", "steps": []}, "axis": 2, "slice": 3}
    with pytest.raises(v.UnsupportedVolumeSchema, match="2D task 'ibisagent'"):
        v.VolumeResult.from_dict(two_d)
    for schema in ("volume-2", "volume-0", None, "1"):
        with pytest.raises(v.UnsupportedVolumeSchema, match="not supported|2D"):
            v.VolumeResult.from_dict(summary(schema=schema))
    with pytest.raises(v.UnsupportedVolumeSchema, match="update the IBISAgent Slicer module"):
        v.VolumeResult.from_dict(summary(schema="volume-9"))
    # the 2D reader refuses a volume record in turn, so neither reader misreads the other's answer
    from IBISAgentLib import TrajectoryView, UnsupportedTrajectoryVersion

    with pytest.raises(UnsupportedTrajectoryVersion):
        TrajectoryView.from_dict({"version": "volume-1", "image_size": [4, 4]})


HOSTILE = {
    "not an object": [1, 2],
    "no session": summary(session_id=""),
    "axis 3": summary(axis=3),
    "axis bool": summary(axis=True),
    "range reversed": summary(range=[12, 5]),
    "range one value": summary(range=[5]),
    "range negative": summary(range=[-1, 4]),
    "slices not a list": summary(slices={"9": "key"}),
    "unknown status": summary(slices=[{"index": 9, "status": "guessed"}], flagged=[]),
    "negative index": summary(slices=[{"index": -2, "status": "key"}], flagged=[]),
    "index a float": summary(slices=[{"index": 2.5, "status": "key"}], flagged=[]),
    "repeated slice": summary(slices=[{"index": 9, "status": "key"}, {"index": 9, "status": "propagated"}], flagged=[]),
    "score nan": summary(slices=[{"index": 9, "status": "key", "score": float("nan")}], flagged=[]),
    "score text": summary(slices=[{"index": 9, "status": "key", "score": "high"}], flagged=[]),
    "area negative": summary(slices=[{"index": 9, "status": "key", "area": -4}], flagged=[]),
    "flagged a text": summary(slices=[{"index": 9, "status": "key", "flagged": "yes"}], flagged=[]),
    "flagged unlisted": summary(flagged=[10, 3]),
    "flagged disagrees": summary(flagged=[]),
    "changed text": summary(changed="all"),
    "seconds negative": summary(seconds=-1),
    "too many slices": summary(slices=[{"index": 0, "status": "key"}] * (v.MAX_SLICES + 1), flagged=[]),
    "slice outside": summary(slices=[{"index": 25, "status": "key"}], flagged=[]),
    "range outside": summary(range=[5, 20]),
    "key outside": summary(key_slice=20),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_malformed_summaries_are_format_errors_naming_the_field(name):
    with pytest.raises(v.VolumeFormatError):
        v.VolumeResult.from_dict(HOSTILE[name], num_slices=DIMS[2])


def test_unreadable_json_is_a_format_error():
    for text in (b"\xff\xfe", "{", "[" * 100000):
        with pytest.raises(v.VolumeFormatError):
            v.VolumeResult.from_json(text)


def record(**over) -> dict:
    mask = np.zeros((30, 40), bool)
    mask[10:14, 5:9] = True
    d = {
        "version": "volume-1",
        "kind": "volume",
        "instruction": "segment the lesion",
        "volume_shape": list(DIMS),
        "axis": 2,
        "slice_size": [30, 40],
        "key_slice": 9,
        "range": [8, 10],
        "slices": [
            {
                "index": 9,
                "status": "key",
                "source": "user",
                "mask": encode_rle(mask),
                "flagged": False,
                "trajectory": {"version": "1", "image_size": [30, 40], "steps": []},
            },
            {
                "index": 10,
                "status": "propagated",
                "source": "propagation",
                "mask": encode_rle(mask[::-1]),
                "flagged": True,
                "reasons": ["low score"],
                "trajectory": None,
            },
        ],
    }
    d.update(over)
    return d, mask


def test_a_record_is_read_and_its_masks_decoded():
    d, mask = record()
    r = v.VolumeRecordView.from_dict(d)
    np.testing.assert_array_equal(r.mask(9), mask)
    np.testing.assert_array_equal(r.mask(10), mask[::-1])
    assert not r.mask(3).any() and r.trajectories[9].image_size == (30, 40) and 10 not in r.trajectories
    assert [s.status for s in r.slices] == ["key", "propagated"]


def test_malformed_records_are_format_errors():
    d, _ = record()
    bad_rle = json.loads(json.dumps(d))
    bad_rle["slices"][0]["mask"] = {"size": [30, 40], "counts": [10**12]}
    wrong_size = json.loads(json.dumps(d))
    wrong_size["slices"][1]["mask"] = encode_rle(np.zeros((40, 30), bool))
    cases = [
        record(slice_size=[40, 30])[0],  # not the slice of volume_shape along the axis
        record(volume_shape=[40, 30])[0],
        record(axis=5)[0],
        record(version="volume-7")[0],
        record(slices=[{"index": 25, "status": "key", "mask": encode_rle(np.zeros((30, 40), bool))}])[0],
        bad_rle,
        wrong_size,
        record(volume_shape=[2**14, 2**14, 3], slice_size=[2**14, 2**14])[0],  # slices above the pixel limit
    ]
    for case in cases:
        with pytest.raises(v.VolumeFormatError):
            v.VolumeRecordView.from_dict(case)


def test_the_request_is_checked_before_it_is_sent():
    ok = v.VolumeRequest("segment the lesion", axis=2, key_slice=9, foreground=[[3, 4, 9]], run_agent=False)
    params = ok.to_params(DIMS)
    assert params == {
        "instruction": "segment the lesion",
        "axis": 2,
        "key_slice": 9,
        "foreground": [[3, 4, 9]],
        "run_agent": False,
        "max_steps": 10,
    }
    pid = v.new_progress_id()
    assert len(pid) == 32 and v.VolumeRequest("x", key_slice=1, progress_id=pid).to_params()["progress_id"] == pid
    repair = v.VolumeRequest("x", session_id="s", action="repair", slice=4, background=[[1, 2, 4]], run_agent=False)
    assert repair.to_params(DIMS)["action"] == "repair"
    bad = {
        "no instruction": dict(instruction=" ", key_slice=1),
        "axis": dict(instruction="x", axis=3, key_slice=1),
        "no key slice": dict(instruction="x"),
        "key slice outside": dict(instruction="x", key_slice=20),
        "reversed range": dict(instruction="x", key_slice=9, first_slice=10, last_slice=3),
        "point outside": dict(instruction="x", key_slice=9, foreground=[[40, 0, 9]]),
        "point of floats": dict(instruction="x", key_slice=9, foreground=[[1.5, 0, 9]]),
        "point 2d": dict(instruction="x", key_slice=9, foreground=[[1, 0]]),
        "tool without points": dict(instruction="x", key_slice=9, run_agent=False),
        "bad progress id": dict(instruction="x", key_slice=9, progress_id="../../etc"),
        "negative budget": dict(instruction="x", key_slice=9, repair_budget=-1),
        "action without session": dict(instruction="x", key_slice=9, action="repair", slice=3),
        "unknown action": dict(instruction="x", session_id="s", action="erase"),
        "repair without slice": dict(instruction="x", session_id="s", action="repair"),
        "accept without slice": dict(instruction="x", session_id="s", action="accept"),
        "undo without slice": dict(instruction="x", session_id="s", action="undo_slice"),
        "repair points elsewhere": dict(
            instruction="x", session_id="s", action="repair", slice=4, foreground=[[1, 1, 5]], run_agent=False
        ),
        "points on propagate": dict(instruction="x", session_id="s", action="propagate", foreground=[[1, 1, 5]]),
        "max steps": dict(instruction="x", key_slice=9, max_steps=0),
    }
    for name, fields in bad.items():
        with pytest.raises(ValueError) as refused:
            v.VolumeRequest(**fields).check(DIMS)
        assert str(refused.value), name
    with pytest.raises(ValueError, match="'accept' needs the slice"):
        v.VolumeRequest("x", session_id="s", action="accept").check(DIMS)


def test_progress_reports_are_checked():
    p = v.VolumeProgress.from_dict(
        {"state": "running", "phase": "propagating", "slices_done": 3, "slices_total": 9, "seconds": 2.0}
    )
    assert p.describe() == "propagating: 3/9 slices, 2 s"
    for bad in ({"state": "sleeping"}, {"state": "done", "slices_done": -1}, {"state": "done", "seconds": "1"}, []):
        with pytest.raises(v.VolumeFormatError):
            v.VolumeProgress.from_dict(bad)


class _Handler(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *args):
        pass

    def _send(self, status, body: bytes, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.seen.append(("GET", self.path, self.headers.get("Authorization")))
        if self.path.endswith("0" * 32):
            self._send(404, b'{"detail": "unknown progress id"}')
        elif self.path.endswith("f" * 32):
            self._send(500, b'{"detail": "boom"}')
        elif self.path.endswith("e" * 32):
            self._send(200, b"[1, 2]")
        else:
            self._send(200, json.dumps({"state": "running", "phase": "propagating", "slices_done": 2}).encode())

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        self.rfile.read(length)
        self.seen.append(("POST", self.path, self.headers.get("Authorization")))
        self._send(200, json.dumps(summary()).encode())


@pytest.fixture
def stub():
    _Handler.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_client_polls_progress_and_asks_the_volume_task(stub):
    client = c.IBISAgentClient(stub, timeout=5, token="secret")
    pid = "ab" * 16
    assert v.VolumeProgress.from_dict(client.progress(pid)).slices_done == 2
    assert client.progress("0" * 32) is None  # not known (yet): the caller keeps polling
    with pytest.raises(c.IBISAgentClientError, match="HTTP 500: boom"):
        client.progress("f" * 32)
    with pytest.raises(c.IBISAgentClientError, match="expected a JSON object"):
        client.progress("e" * 32)
    for bad in ("../info", "AB" * 16, "", None):
        with pytest.raises(ValueError, match="32 lowercase hex"):
            client.progress(bad)
    result, label = client.infer("ct", {"instruction": "x"}, output="json", model=v.VOLUME_MODEL)
    assert v.VolumeResult.from_dict(result).session_id == "abc123" and label is None
    assert ("GET", f"/ibisagent/progress/{pid}", "Bearer secret") in _Handler.seen
    assert ("POST", "/infer/ibisagent_volume?image=ct&output=json", "Bearer secret") in _Handler.seen


def test_field_names_are_the_volume_tasks_fields():
    pytest.importorskip("monailabel")
    import dataclasses

    from monailabel_app.lib.volume_request import ACTIONS, VOLUME_FIELDS

    assert sorted(f.name for f in dataclasses.fields(v.VolumeRequest)) == sorted(VOLUME_FIELDS)
    assert v.ACTIONS == ACTIONS


def test_the_volume_task_parses_what_the_module_sends():
    pytest.importorskip("monailabel")
    from monailabel_app.lib.volume_request import VolumeParams

    pid = v.new_progress_id()
    sent = v.VolumeRequest(
        " segment the lesion ",
        axis=1,
        key_slice=4,
        foreground=[[3, 4, 5]],
        background=[[1, 4, 2]],
        first_slice=2,
        last_slice=9,
        repair_budget=2,
        auto_repair=True,
        progress_id=pid,
        run_agent=False,
        max_steps=3,
    ).to_params(DIMS)
    parsed = VolumeParams.parse(sent, step_limit=20, max_clicks=64, run_agent_default=True)
    assert (parsed.instruction, parsed.axis, parsed.key_slice, parsed.first_slice, parsed.last_slice) == (
        "segment the lesion",
        1,
        4,
        2,
        9,
    )
    assert parsed.foreground == [[3, 4, 5]] and parsed.background == [[1, 4, 2]] and parsed.progress_id == pid
    assert (parsed.repair_budget, parsed.auto_repair, parsed.run_agent, parsed.max_steps) == (2, True, False, 3)
    assert set(parsed.points_by_slice(1, DIMS)) == {4}
    repair = v.VolumeRequest(
        "segment the lesion", axis=1, session_id="s", action="repair", slice=4, foreground=[[3, 4, 5]], run_agent=False
    ).to_params(DIMS)
    parsed = VolumeParams.parse(repair, step_limit=20, max_clicks=64, run_agent_default=True)
    assert (parsed.session_id, parsed.action, parsed.slice) == ("s", "repair", 4)
