"""The volume task `ibisagent_volume` over HTTP: the real `monailabel start_server` (classical tool, no model, one
volume job at a time) on a studies folder holding a RECIST CT volume as NIfTI (`ct_lesion`), a synthetic volume big
enough to poll its progress (`long_cyl`) and a PNG. One server for the module; sessions are made per test.

Covers the contract in monailabel_app/README.md ("The volume task"): a new session end to end (label geometry, Dice
against the ground truth with the user's clicks on the key slice), repair / undo_slice / propagate / accept
continuations, progress while running and when done, busy (503), refused requests (4xx, session unchanged), and
Slicer's stock module's 3D deepgrow request replayed with `monailabel.client`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DEMO, RECIST

requests = pytest.importorskip("requests")
pytest.importorskip("monailabel")
nib = pytest.importorskip("nibabel")

from monailabel.client import MONAILabelClient  # noqa: E402
from monailabel.client.client import MONAILabelClientException  # noqa: E402
from requests_toolbelt.multipart.decoder import MultipartDecoder  # noqa: E402

from tests.monailabel_app.test_server import LIVER, TOOL, VOLUME, _build_studies, _Server  # noqa: E402

TASK = "ibisagent_volume"
LONG = "long_cyl"
CROP = "ct_crop"  # the RECIST volume cut to 160x160 around its lesion: most tests use it (4x faster per slice)
CROP_SIDE = 160
LONG_SHAPE = (128, 128, 80)

pytestmark = pytest.mark.skipif(
    not (DEMO.is_dir() and RECIST.is_dir()), reason=f"shared data not found at {DEMO.parent} / {RECIST}"
)


def _long_volume(path: Path) -> np.ndarray:
    """A bright cylinder-like object (radius swelling and shrinking along k) in noise; returns its ground truth."""
    rng = np.random.default_rng(0)
    size, depth = LONG_SHAPE[0], LONG_SHAPE[2]
    ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    gt = np.zeros(LONG_SHAPE, bool)
    for k in range(2, depth - 2):
        r = size * 0.25 * np.sin(np.pi * (k - 1) / (depth - 2)) + 3
        gt[:, :, k] = (ii - size / 2 - 0.1 * k) ** 2 + (jj - size / 2) ** 2 < r * r
    volume = rng.normal(60, 8, LONG_SHAPE)
    volume[gt] += 100
    nib.save(nib.Nifti1Image(volume.astype(np.int16), np.diag([0.8, 0.8, 2.0, 1.0])), path)
    return gt


def _crop(studies: Path, data: dict) -> dict:
    """`CROP`: the RECIST volume's CROP_SIDE x CROP_SIDE window around its lesion click, every slice."""
    image = nib.load(str(studies / f"{VOLUME}.nii.gz"))
    (i, j), shape = data["lesion_click"], image.shape
    i0 = min(max(i - CROP_SIDE // 2, 0), shape[0] - CROP_SIDE)
    j0 = min(max(j - CROP_SIDE // 2, 0), shape[1] - CROP_SIDE)
    window = (slice(i0, i0 + CROP_SIDE), slice(j0, j0 + CROP_SIDE), slice(None))
    affine = image.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ [i0, j0, 0]
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[window], affine), studies / f"{CROP}.nii.gz")
    return {"crop_gts": data["volume_gts"][window], "crop_click": [i - i0, j - j0], "crop_affine": affine}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("volume_task")
    studies = tmp / "studies"
    data = _build_studies(studies)
    long_gt = _long_volume(studies / f"{LONG}.nii.gz")
    crop = _crop(studies, data)
    conf = {"tool": TOOL, "labels": "lesion", "max_volume_jobs": "1", "repair_budget": "3", "max_volume_sessions": "4"}
    srv = _Server("volume", studies, tmp, conf)
    try:
        srv.wait_ready()
        yield {"server": srv, "tmp": tmp, "long_gt": long_gt, **data, **crop}
    finally:
        srv.stop()


# -- helpers ---------------------------------------------------------------------------------------------------------
def _post(server, params, image: str = CROP, output: str = "all", files=None, **query) -> requests.Response:
    data = {"params": json.dumps(params)}
    query = {"image": image, "output": output, **query}
    return requests.post(f"{server['server'].url}/infer/{TASK}", params=query, data=data, files=files, timeout=300)


def _all(response) -> tuple[dict, np.ndarray, np.ndarray]:
    """output=all: (result JSON, label volume, label affine)."""
    assert response.status_code == 200, response.text[:2000]
    parts = {}
    for part in MultipartDecoder.from_response(response).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        parts["params" if 'name="params"' in disposition else "image"] = part.content
    image = nib.Nifti1Image.from_bytes(_gunzip(parts["image"]))
    return json.loads(parts["params"]), np.asanyarray(image.dataobj), image.affine


def _gunzip(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def _lesion_start(server, **extra) -> tuple[dict, np.ndarray]:
    """A new session on CROP with one click on the lesion's largest slice."""
    k, (i, j) = server["lesion_slice"], server["crop_click"]
    params = {"instruction": "segment the lesion", "foreground": [[i, j, k]], "run_agent": False, **extra}
    result, label, _ = _all(_post(server, params))
    return result, label


def _refused(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text[:1000]
    assert fragment in response.json()["detail"], response.json()["detail"]


def _by_index(result: dict) -> dict[int, dict]:
    return {s["index"]: s for s in result["slices"]}


# -- tests -----------------------------------------------------------------------------------------------------------
def test_info_lists_the_volume_task(server):
    info = requests.get(server["server"].url + "/info/", timeout=30).json()
    task = info["models"][TASK]
    assert task["dimension"] == 3 and task["type"] == "deepgrow" and task["labels"] == ["lesion"]
    assert task["config"] == {"max_steps": 20, "run_agent": False}
    assert task["ibisagent"]["max_volume_jobs"] == 1 and info["models"]["ibisagent"]["dimension"] == 2


def test_a_new_session_segments_the_volume_from_clicks_on_the_key_slice(server):
    k = server["lesion_slice"]
    result, label, affine = _all(
        _post(
            server,
            {
                "instruction": "segment the lesion",
                "foreground": [[*server["lesion_click"], k]],
                "run_agent": False,
                "progress_id": (pid := uuid.uuid4().hex),
            },
            image=VOLUME,
        )
    )
    gt = server["volume_gts"] > 0
    assert label.shape == server["volume_shape"] and label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
    np.testing.assert_allclose(affine, server["volume_affine"])
    dice = _dice(label, gt)
    assert dice > 0.75, f"3D Dice {dice:.3f} with one click on the key slice"
    assert result["key_slice"] == k and result["axis"] == 2 and result["range"] == [0, gt.shape[2] - 1]
    slices = _by_index(result)
    assert slices[k]["status"] == "key" and slices[k]["source"] == "user" and slices[k]["area"] > 0
    assert {s["status"] for s in result["slices"]} <= {"key", "propagated", "absent"}
    assert any(s["status"] == "propagated" for s in result["slices"])
    for s in result["slices"]:  # the label file carries exactly the reported slices' masks
        assert int(label[:, :, s["index"]].sum()) == s["area"]
        assert set(s) == {"index", "status", "source", "score", "flagged", "reasons", "reviewed", "area"}
    outside = [i for i in range(gt.shape[2]) if i not in slices]
    assert not label[:, :, outside].any()
    assert result["flagged"] == [s["index"] for s in result["slices"] if s["flagged"]]
    assert result["repairs_used"] == 0 and result["repair_budget"] == 3 and result["clicks"] == 1
    assert result["stop_reason"] == "agent_not_run" and result["ignored_points"] == []
    assert result["schema"] == "volume-1" and result["summary"]["volume_shape"] == list(gt.shape)
    assert "slices" not in result["summary"] and list(result["trajectories"]) == [str(k)]
    assert sorted(result["changed"]) == sorted(slices)
    progress = requests.get(f"{server['server'].url}/ibisagent/progress/{pid}", timeout=30).json()
    assert progress["state"] == "done" and progress["seconds"] > 0


def test_a_repair_changes_only_its_slice_and_those_beyond_it_and_undo_restores(server):
    k = server["lesion_slice"]
    result, label = _lesion_start(server)
    gt = server["crop_gts"] > 0
    slices = _by_index(result)
    # the first propagated slice above the key that still holds the lesion in the ground truth
    s = next(i for i in range(k + 1, gt.shape[2]) if gt[:, :, i].any() and i in slices)
    from scipy.ndimage import distance_transform_edt

    y, x = np.unravel_index(int(np.argmax(distance_transform_edt(gt[:, :, s].T))), gt[:, :, s].T.shape)
    params = {"session_id": result["session_id"], "action": "repair", "slice": s, "foreground": [[int(x), int(y), s]]}
    repaired, label2, _ = _all(_post(server, {**params, "run_agent": False}))
    assert repaired["session_id"] == result["session_id"] and repaired["repairs_used"] == 1
    changed = repaired["changed"]
    assert s in changed and all(i >= s for i in changed), changed  # away from the key only
    unchanged = [i for i in range(gt.shape[2]) if i not in changed]
    np.testing.assert_array_equal(label2[:, :, unchanged], label[:, :, unchanged])
    after = _by_index(repaired)[s]
    assert after["status"] == "repaired" and after["source"] == "user" and not after["flagged"]
    assert str(s) in repaired["trajectories"] and repaired["clicks"] == 2
    undone, label3, _ = _all(
        _post(server, {"session_id": result["session_id"], "action": "undo_slice", "slice": s, "run_agent": False})
    )
    assert undone["repairs_used"] == 0 and sorted(undone["changed"]) == sorted(changed)
    np.testing.assert_array_equal(label3, label)
    assert [(d["index"], d["status"]) for d in undone["slices"]] == [
        (d["index"], d["status"]) for d in result["slices"]
    ]


def test_the_range_shrinks_and_extends_again(server):
    k = server["lesion_slice"]
    result, label = _lesion_start(server)
    sid = result["session_id"]
    small, label2, _ = _all(
        _post(
            server,
            {"session_id": sid, "action": "propagate", "first_slice": k - 1, "last_slice": k + 1, "run_agent": False},
        )
    )
    assert small["range"] == [k - 1, k + 1] and [s["index"] for s in small["slices"]] == [k - 1, k, k + 1]
    outside = [i for i in range(label.shape[2]) if not k - 1 <= i <= k + 1]
    assert not label2[:, :, outside].any()
    np.testing.assert_array_equal(label2[:, :, k - 1 : k + 2], label[:, :, k - 1 : k + 2])
    full, label3, _ = _all(
        _post(
            server,
            {
                "session_id": sid,
                "action": "propagate",
                "first_slice": 0,
                "last_slice": label.shape[2] - 1,
                "run_agent": False,
            },
        )
    )
    assert full["range"] == [0, label.shape[2] - 1]
    np.testing.assert_array_equal(label3, label)  # the same propagation from the same key


def test_an_uploaded_label_is_the_key_slices_initial_mask(server, tmp_path):
    k, gt = server["lesion_slice"], server["crop_gts"] > 0
    upload = np.zeros(gt.shape, np.uint8)
    upload[:, :, k] = gt[:, :, k]
    upload[:, :, k + 1] = 1  # other slices of the upload are not read
    path = tmp_path / "initial.nii.gz"
    nib.save(nib.Nifti1Image(upload, server["crop_affine"]), path)
    params = {"instruction": "segment the lesion", "key_slice": k, "run_agent": False}
    result, label, _ = _all(_post(server, params, files={"label": ("initial.nii.gz", path.read_bytes())}))
    np.testing.assert_array_equal(label[:, :, k], gt[:, :, k])
    assert _by_index(result)[k]["status"] == "key" and result["clicks"] == 0
    assert _by_index(result)[k]["source"] == "user"  # the user's mask, no agent involved
    assert _dice(label, gt) > 0.75
    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), wrong)
    refused = _post(server, params, output="json", files={"label": ("wrong.nii.gz", wrong.read_bytes())})
    _refused(refused, 400, "the label upload has shape [8, 8, 8]")


def test_accept_marks_a_slice_reviewed_and_unflags_it(server):
    result, label = _lesion_start(server)
    candidates = result["flagged"] or [s["index"] for s in result["slices"] if s["status"] == "propagated"]
    s = candidates[0]
    accepted, label2, _ = _all(
        _post(server, {"session_id": result["session_id"], "action": "accept", "slice": s, "run_agent": False})
    )
    entry = _by_index(accepted)[s]
    assert entry["reviewed"] and not entry["flagged"] and s not in accepted["flagged"]
    assert accepted["repairs_used"] == 0 and accepted["changed"] == [s]
    np.testing.assert_array_equal(label2, label)


def test_progress_is_reported_while_a_volume_propagates_and_a_second_job_is_refused(server):
    size, depth = LONG_SHAPE[0], LONG_SHAPE[2]
    pid = uuid.uuid4().hex
    params = {
        "instruction": "segment the cylinder",
        "foreground": [[size // 2, size // 2, depth // 2]],
        "run_agent": False,
    }
    answers = {}

    def run():
        answers["first"] = _post(server, {**params, "progress_id": pid}, image=LONG)

    worker = threading.Thread(target=run)
    worker.start()
    url = f"{server['server'].url}/ibisagent/progress/{pid}"
    seen, busy = [], None
    deadline = time.monotonic() + 120
    while worker.is_alive() and time.monotonic() < deadline:
        response = requests.get(url, timeout=30)
        if response.status_code == 200:
            seen.append(response.json())
            if busy is None and seen[-1]["state"] == "running" and seen[-1]["phase"] == "propagate":
                busy = _post(server, params, image=LONG)  # max_volume_jobs is 1
        time.sleep(0.05)
    worker.join(timeout=300)
    assert busy is not None, f"never saw the request running: {seen}"
    _refused(busy, 503, "busy with 1 volume request")
    running = [p for p in seen if p["state"] == "running" and p["phase"] == "propagate"]
    assert running and all(0 <= p["slices_done"] <= p["slices_total"] == depth - 1 for p in running)
    result, label, _ = _all(answers["first"])
    done = requests.get(url, timeout=30).json()
    assert done["state"] == "done" and done["seconds"] >= max(p["seconds"] for p in seen)
    assert _dice(label, server["long_gt"]) > 0.85
    # polls were answered while the volume propagated (the request runs in a worker thread)
    assert len(running) >= 2


BAD = [
    ({"instruction": "x", "key_slice": 999, "run_agent": False}, 400, "params.key_slice=999 is out of range"),
    ({"instruction": "x", "key_slice": 3, "axis": 5, "run_agent": False}, 400, "params.axis must be 0, 1 or 2"),
    (
        {
            "instruction": "x",
            "key_slice": 5,
            "first_slice": 8,
            "last_slice": 2,
            "foreground": [[1, 1, 5]],
            "run_agent": False,
        },
        400,
        "is after params.last_slice",
    ),
    (
        {
            "instruction": "x",
            "key_slice": 5,
            "first_slice": 7,
            "last_slice": 9,
            "foreground": [[1, 1, 5]],
            "run_agent": False,
        },
        400,
        "must hold the key slice 5",
    ),
    ({"instruction": "x", "foreground": [[1, 1]], "run_agent": False}, 400, "must be an [i, j, k] voxel index"),
    ({"instruction": "x", "foreground": [[1, 1, 9999]], "run_agent": False}, 400, "lies outside the volume"),
    ({"instruction": "x", "run_agent": False}, 400, "key_slice is missing"),
    ({"instruction": "x", "key_slice": 3, "run_agent": False}, 400, "nothing to do on the key slice 3"),
    ({"instruction": "x", "foreground": [[1, 1, 3]], "run_agent": True}, 400, "no policy model configured"),
    (
        {"instruction": "x", "foreground": [[1, 1, 3]], "action": "repair", "run_agent": False},
        400,
        "continue a session",
    ),
    ({"session_id": "0" * 32, "action": "repair", "slice": 3, "run_agent": False}, 404, "is unknown"),
    ({"instruction": "x", "foreground": [[1, 1, 3]], "progress_id": "NOT-HEX", "run_agent": False}, 400, "progress_id"),
]


@pytest.mark.parametrize(("params", "status", "fragment"), BAD)
def test_bad_new_requests_are_refused_with_a_message(server, params, status, fragment):
    _refused(_post(server, params, output="json"), status, fragment)


def test_a_2d_image_is_not_a_volume(server):
    params = {"instruction": "x", "key_slice": 0, "foreground": [[1, 1, 0]], "run_agent": False}
    _refused(_post(server, params, image=LIVER, output="json"), 400, "is a 2D image, not a 3D volume")


def test_bad_continuations_are_refused_and_leave_the_session_unchanged(server):
    k = server["lesion_slice"]
    result, label = _lesion_start(server)
    sid, n = result["session_id"], label.shape[2]
    bad = [
        ({"action": "explode", "slice": k}, "params.action must be one of"),
        ({"slice": k}, "params.action is missing"),
        ({"action": "repair", "slice": n + 3, "foreground": [[1, 1, n + 3]]}, "lies outside the volume"),
        ({"action": "repair", "slice": k + 1, "foreground": [[1, 1, k + 2]]}, "send points of that slice only"),
        ({"action": "repair", "slice": k + 1}, "nothing to repair on slice"),
        ({"action": "undo_slice", "slice": k + 1}, "has no change to undo"),
        ({"action": "propagate", "first_slice": k + 1}, f"must hold the key slice {k}"),
        ({"action": "propagate", "first_slice": 5, "last_slice": 2}, "is after params.last_slice"),
        ({"action": "accept", "slice": n + 1}, "params.slice=" + str(n + 1) + " is out of range"),
        ({"action": "repair", "slice": k, "axis": 0, "foreground": [[1, 1, k]]}, "works on axis 2"),
        ({"action": "propagate", "key_slice": 1}, "start a session"),
    ]
    for params, fragment in bad:
        _refused(_post(server, {"session_id": sid, "run_agent": False, **params}, output="json"), 400, fragment)
    other = _post(server, {"session_id": sid, "action": "accept", "slice": k, "run_agent": False}, image=LONG)
    _refused(other, 400, f"works on image {CROP!r}")
    # unchanged: the same propagation again gives the same slices and label
    again, label2, _ = _all(_post(server, {"session_id": sid, "action": "propagate", "run_agent": False}))
    assert [(s["index"], s["status"], s["area"]) for s in again["slices"]] == [
        (s["index"], s["status"], s["area"]) for s in result["slices"]
    ]
    np.testing.assert_array_equal(label2, label)


def test_the_repair_budget_is_checked_before_the_session_changes(server):
    k = server["lesion_slice"]
    result, _ = _lesion_start(server, repair_budget=0)
    s = next(i for i in _by_index(result) if i != k)
    _refused(
        _post(
            server,
            {
                "session_id": result["session_id"],
                "action": "repair",
                "slice": s,
                "foreground": [[1, 1, s]],
                "run_agent": False,
            },
        ),
        400,
        "the repair budget of 0 slice(s) is spent",
    )
    again, _, _ = _all(_post(server, {"session_id": result["session_id"], "action": "propagate", "run_agent": False}))
    assert again["repairs_used"] == 0 and _by_index(again)[s]["status"] == _by_index(result)[s]["status"]


def test_progress_of_an_unknown_id_is_404(server):
    url = server["server"].url + "/ibisagent/progress/"
    assert requests.get(url + uuid.uuid4().hex, timeout=30).status_code == 404
    assert requests.get(url + "nothex", timeout=30).status_code == 404


def test_points_on_other_slices_become_user_repairs_and_the_rest_is_reported(server):
    k, (i, j) = server["lesion_slice"], server["crop_click"]
    points = [[i, j, k], [i, j, k + 1], [i, j, k - 1], [i, j, k - 2], [i, j, k + 3]]
    result, label, _ = _all(
        _post(
            server,
            {
                "instruction": "segment the lesion",
                "foreground": points,
                "run_agent": False,
                "repair_budget": 2,
                "last_slice": k + 2,
            },
        )
    )
    slices = _by_index(result)
    assert slices[k]["status"] == "key" and result["repairs_used"] == 2
    assert slices[k + 1]["status"] == "repaired" and slices[k - 1]["status"] == "repaired"
    assert slices[k + 1]["source"] == "user"
    assert sorted((p["slice"], p["reason"].split(" ")[0]) for p in result["ignored_points"]) == [
        (k - 2, "beyond"),
        (k + 3, "outside"),
    ]


def test_the_slicer_modules_requests_and_result_reader_agree_with_the_server(server):
    """The other side of the contract: this project's Slicer library (`IBISAgentLib.volume`) writes the params and
    reads every answer's summary."""
    import sys

    lib_dir = str(Path(__file__).resolve().parents[2] / "slicer_module" / "IBISAgent")
    if lib_dir not in sys.path:
        sys.path.insert(0, lib_dir)
    from IBISAgentLib.volume import VolumeRequest, VolumeResult

    k, (i, j) = server["lesion_slice"], server["crop_click"]
    dims = server["crop_gts"].shape

    def send(request: VolumeRequest) -> VolumeResult:
        result, label, _ = _all(_post(server, request.to_params(dims)))
        assert label.shape == dims
        return VolumeResult.from_dict(result, num_slices=dims[2])

    pid = uuid.uuid4().hex
    new = send(
        VolumeRequest("segment the lesion", key_slice=k, foreground=[[i, j, k]], run_agent=False, progress_id=pid)
    )
    assert new.key_slice == k and new.status(k).status == "key" and new.range == (0, dims[2] - 1)
    sid, s = new.session_id, k + 1
    repaired = send(
        VolumeRequest(
            "segment the lesion", session_id=sid, action="repair", slice=s, foreground=[[i, j, s]], run_agent=False
        )
    )
    assert repaired.status(s).status == "repaired" and repaired.repairs_used == 1
    # the library sends run_agent true by default: actions that do not run the agent take it on a server without a model
    undone = send(VolumeRequest("segment the lesion", session_id=sid, action="undo_slice", slice=s))
    assert undone.repairs_used == 0 and undone.status(s).status != "repaired"
    ranged = send(
        VolumeRequest("segment the lesion", session_id=sid, action="propagate", first_slice=k - 1, last_slice=k + 1)
    )
    assert ranged.range == (k - 1, k + 1) and ranged.indices == [k - 1, k, k + 1]
    accepted = send(VolumeRequest("segment the lesion", session_id=sid, action="accept", slice=k + 1))
    assert accepted.status(k + 1).reviewed and accepted.changed == [k + 1]


# -- Slicer's stock MONAI Label module ---------------------------------------------------------------------------------
@pytest.fixture
def client(server, tmp_path):
    return MONAILabelClient(server["server"].url, tmpdir=str(tmp_path), client_id="slicer")


def test_the_stock_modules_3d_deepgrow_request_gives_a_volume_label(server, client):
    """What `onClickDeepgrow` sends for a dimension-3 deepgrow model: the segment's name, the points of every slice,
    no `slice`, and the task's config values (`getParamsFromConfig`)."""
    k, (i, j) = server["lesion_slice"], server["crop_click"]
    config = client.info()["models"][TASK]["config"]
    params = {"label": "lesion", "foreground": [[i, j, k], [i, j, k - 1]], "background": [], **config}
    label_path, result = client.infer(TASK, CROP, params)
    label = np.asanyarray(nib.load(label_path).dataobj)
    assert label.shape == server["crop_gts"].shape
    assert result["key_slice"] == k and result["summary"]["instruction"] == "segment the lesion"
    assert _by_index(result)[k - 1]["status"] == "repaired"
    assert _dice(label, server["crop_gts"] > 0) > 0.75
    # File > Add Data: the same volume through an upload session
    path = server["tmp"] / "studies" / f"{CROP}.nii.gz"
    sid = client.create_session(str(path))["session_id"]
    label_path, result = client.infer(TASK, "added", params, session_id=sid)
    assert result["image"] == f"upload-{sid}" and np.asanyarray(nib.load(label_path).dataobj).shape == label.shape
    with pytest.raises(MONAILabelClientException, match="is a 2D image"):
        client.infer(TASK, LIVER, {**params, "foreground": [[1, 1, 0]]})


# -- without a server: the progress board, the token on its endpoint, sessions freed when they end ----------------------
def test_progress_entries_are_bounded_and_expire():
    from monailabel_app.lib.errors import RequestError
    from monailabel_app.lib.progress import ProgressBoard

    now = [0.0]
    board = ProgressBoard(max_entries=2, keep_s=10.0, clock=lambda: now[0])
    ids = [uuid.uuid4().hex for _ in range(3)]
    first = board.start(ids[0], 5)
    first.phase("propagate", slices_total=7)
    first.tick()
    now[0] = 1.5
    assert board.get(ids[0]) == {
        "state": "running",
        "phase": "propagate",
        "slices_done": 1,
        "slices_total": 7,
        "seconds": 1.5,
    }
    with pytest.raises(RequestError, match="still running"):
        board.start(ids[0], 1)
    first.finish(True)
    board.start(ids[1], 1)
    board.start(ids[2], 1)  # the oldest goes
    with pytest.raises(RequestError, match="unknown or expired"):
        board.get(ids[0])
    now[0] = 30.0
    with pytest.raises(RequestError, match="unknown or expired"):
        board.get(ids[2])
    with pytest.raises(RequestError, match="32 lowercase hex"):
        board.start("ABC", 1)


def test_the_progress_endpoint_needs_the_token():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from monailabel_app.lib.endpoints import install, is_served
    from monailabel_app.lib.progress import BOARD

    app = FastAPI()
    token = "a-token-of-sixteen-or-more"
    install(app, 1 << 20, token)
    pid = uuid.uuid4().hex
    BOARD.start(pid, 3).finish(True)
    client = TestClient(app)
    assert is_served("GET", f"/ibisagent/progress/{pid}")
    assert client.get(f"/ibisagent/progress/{pid}").status_code == 401
    ok = client.get(f"/ibisagent/progress/{pid}", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and ok.json()["state"] == "done"
    assert client.get("/health").status_code == 200


def test_evicted_and_expired_volume_sessions_are_freed():
    from monailabel_app.lib.sessions import SessionStore

    class Entry:
        def __init__(self, sid):
            self.id = sid

    now, ended = [0.0], []
    store = SessionStore(10.0, 2, clock=lambda: now[0], on_end=lambda e: ended.append(e.id))
    for sid in ("a", "b", "c"):
        store.add(Entry(sid))
    assert ended == ["a"]  # evicted
    now[0] = 11.0
    assert len(store) == 0 and sorted(ended) == ["a", "b", "c"]  # expired


def _task(policy_factory=None, max_sessions: int = 4, tools=None, propagator_factory=None):
    from ibisagent.tools import build_propagator, build_tool
    from monailabel_app.lib.infers.ibisagent_volume_task import IBISAgentVolumeTask
    from monailabel_app.lib.sessions import ToolLeases

    return IBISAgentVolumeTask(
        tools=tools or ToolLeases(lambda: build_tool("classical"), 1).lease,
        propagator_factory=propagator_factory or build_propagator,
        policy_factory=policy_factory,
        dialect="ibis",
        max_steps=5,
        session_ttl=600,
        max_sessions=max_sessions,
        max_jobs=1,
        repair_budget=4,
        labels=["lesion"],
        server_info={},
    )


def _gap_volume(tmp_path: Path) -> str:
    """A 64x64x20 disc in noise on slices 2..17 that fades out on slice 13 (a gap the audit flags)."""
    size, depth = 64, 20
    ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    gt = np.zeros((size, size, depth), bool)
    gt[:, :, 2 : depth - 2] = ((ii - 32) ** 2 + (jj - 32) ** 2 < 14**2)[..., None]
    volume = np.random.default_rng(0).normal(60, 6, gt.shape)
    volume[gt] += 100
    volume[:, :, GAP][gt[:, :, GAP]] -= 100
    path = tmp_path / "gap.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), np.eye(4)), path)
    return str(path)


GAP = 13


def test_auto_repair_lets_the_agent_review_flagged_slices_and_evicted_sessions_are_closed(tmp_path):
    """In process: a policy that terminates at once looks at each flagged slice and accepts it (marked reviewed, no
    repair spent); a second session beyond max_sessions 1 frees the first one's propagator."""
    from ibisagent.policies.replay import ReplayPolicy
    from monailabel_app.lib.request import IMAGE_ID_KEY

    task = _task(lambda: ReplayPolicy([]), max_sessions=1)
    request = {IMAGE_ID_KEY: "gap", "image": _gap_volume(tmp_path), "instruction": "x", "foreground": [[32, 32, 8]]}
    _, plain = task({**request, "run_agent": False})
    first = task.sessions.get(plain["session_id"])
    _, reviewed = task({**request, "run_agent": False, "auto_repair": True})
    assert first.closed and first.volume.propagator.inner._slices is None  # evicted: its state freed
    assert reviewed["flagged"] == [] and reviewed["repairs_used"] == 0
    # undoing the key slice: first its propagation, then the key; after that only undo is taken
    sid = reviewed["session_id"]
    request = {k: v for k, v in request.items() if k != "foreground"}
    _, unpropagated = task({**request, "session_id": sid, "action": "undo_slice", "slice": 8, "run_agent": False})
    assert [s["index"] for s in unpropagated["slices"]] == [8]
    label_path, empty = task({**request, "session_id": sid, "action": "undo_slice", "slice": 8, "run_agent": False})
    assert (
        empty["key_slice"] is None and empty["slices"] == [] and not np.asanyarray(nib.load(label_path).dataobj).any()
    )
    from monailabel_app.lib.errors import RequestError

    with pytest.raises(RequestError, match="has no key slice any more"):
        task({**request, "session_id": sid, "action": "propagate", "run_agent": False})
    assert GAP in plain["flagged"], plain["slices"]
    agent_seen = {s["index"] for s in reviewed["slices"] if s["reviewed"]}
    assert agent_seen >= set(plain["flagged"]) and reviewed["stop_reason"] != "agent_not_run"
    assert [s["area"] for s in reviewed["slices"]] == [s["area"] for s in plain["slices"]]


class _VideoLike:
    """A propagator shaped like sam2's video predictor (a `predictor` the task shares, one instance per session) that
    propagates with a weight-free tool of its own and, at every slice, has a 2D request on another image served from
    the 2D task's pool (a thread that must get the slot within 10 s)."""

    def __init__(self, predictor: dict, name: str = "video-like", feature_cache: int = 8):
        from ibisagent.tools import build_tool
        from ibisagent.volume import ToolPropagator

        self.predictor, self.name, self.feature_cache = predictor, name, feature_cache
        self._inner = ToolPropagator(build_tool("classical"))

    def set_volume(self, slices):
        self._inner.set_volume(slices)

    def add_anchor(self, index, mask):
        self._inner.add_anchor(index, mask)

    def remove_anchor(self, index):
        self._inner.remove_anchor(index)

    def close(self):
        self._inner.close()

    def propagate(self, start, direction, stop):
        from monailabel_app.lib.sessions import SliceKey

        pool = self.predictor["pool"]
        for out in self._inner.propagate(start, direction, stop):

            def request_2d():
                with pool.use(SliceKey("another image", None, 2), np.zeros((32, 32, 3), np.uint8)):
                    pass

            thread = threading.Thread(target=request_2d, daemon=True)
            thread.start()
            thread.join(timeout=10)
            self.predictor["served"].append(not thread.is_alive())
            yield out


def test_a_model_propagation_leaves_the_2d_tool_to_2d_requests(tmp_path):
    """A model tool: the volume job borrows the 2D task's only slot for its 2D work (key slice, repairs) and gives it
    back while the video predictor propagates; the repair after 2D requests took the slot is right."""
    from ibisagent.tools import build_tool
    from monailabel_app.lib.request import IMAGE_ID_KEY
    from monailabel_app.lib.sessions import SliceKey, ToolPool

    pool = ToolPool(lambda: build_tool("classical"), 1)
    predictor = {"pool": pool, "served": []}
    task = _task(tools=pool.borrow, propagator_factory=lambda tool: _VideoLike(predictor))
    request = {IMAGE_ID_KEY: "gap", "image": _gap_volume(tmp_path), "instruction": "x", "run_agent": False}
    _, first = task({**request, "foreground": [[32, 32, 8]]})
    assert predictor["served"] and all(predictor["served"])
    areas = {s["index"]: s["area"] for s in first["slices"]}
    assert areas[8] > 400 and len(first["slices"]) >= 14
    served = len(predictor["served"])
    _, repaired = task(
        {**request, "session_id": first["session_id"], "action": "repair", "slice": 4, "background": [[32, 32, 4]]}
    )
    after = {s["index"]: s for s in repaired["slices"]}
    assert after[4]["status"] == "repaired" and after[4]["area"] < areas[4]  # the negative click on its own image
    assert len(predictor["served"]) > served and all(predictor["served"])  # re-propagated outward, slot free
    with pool.use(SliceKey("gap", 4, 2), np.zeros((64, 64, 3), np.uint8)) as (_, encoded):
        assert encoded  # the slot is free after the job


def test_the_agent_runs_on_the_key_slice_and_auto_repairs_with_a_real_tiny_vlm(tmp_path):
    """In process, a tiny random Qwen2.5-VL as the policy (its text is mostly malformed: the runs end cleanly)."""
    from ibisagent.policies.hf_vlm import HFVLMPolicy
    from ibisagent.testing import build_tiny_qwen2_5_vl
    from ibisagent.trajectory import STOP_REASONS
    from monailabel_app.lib.request import IMAGE_ID_KEY

    build_tiny_qwen2_5_vl(tmp_path / "tiny")
    base = HFVLMPolicy.from_pretrained(str(tmp_path / "tiny"), device="cpu", max_new_tokens=16)
    task = _task(lambda: HFVLMPolicy(base.model, base.processor, max_new_tokens=16))
    path = _gap_volume(tmp_path)
    request = {IMAGE_ID_KEY: "gap", "image": path, "instruction": "segment the disc", "max_steps": 2}
    _, plain = task({**request, "foreground": [[32, 32, 8]], "auto_repair": False})
    assert plain["stop_reason"] in STOP_REASONS and GAP in plain["flagged"]
    key = plain["trajectories"]["8"]
    assert key["meta"]["user_steps"] == [0] and len(key["steps"]) > 1  # the user's click, then the agent
    _, auto = task({**request, "foreground": [[32, 32, 8]], "auto_repair": True})
    looked_at = {s["index"] for s in auto["slices"] if s["reviewed"] or s["status"] == "repaired"}
    assert looked_at >= set(plain["flagged"]) and auto["flagged"] == []
    assert auto["repairs_used"] <= auto["repair_budget"] and str(GAP) in auto["trajectories"]
