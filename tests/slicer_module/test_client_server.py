"""IBISAgentLib's client against the REAL IBISAgent MONAI Label server (`monailabel start_server` as a subprocess on
127.0.0.1, no policy model: tool-only requests), with a studies folder built in a temporary directory from
../shared/data. This is the Slicer module's side of the HTTP contract: every request here is one the module's Logic
sends, decoded with the module's own library."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from IBISAgentLib import (
    AgentRequest,
    IBISAgentClient,
    IBISAgentClientError,
    TrajectoryView,
    ijk_array_to_kji,
    kji_array_to_ijk,
    kji_slice,
    pixel_to_voxel_centre,
    png_mask_bytes,
    read_nifti,
    slice_shape,
    write_nifti,
)

from tests.conftest import DEMO, RECIST
from tests.slicer_module.serverprocess import APP, find_monailabel, running_server

pytest.importorskip("monailabel")
nib = pytest.importorskip("nibabel")

from ibisagent.trajectory import Trajectory  # noqa: E402  (the core reads the same JSON: both sides of the contract)

VENV_BIN = Path(os.path.abspath(sys.executable)).parent  # not resolve(): the venv links to its base python
PNG_ID, VOLUME_ID = "04_CT_liver", "ct_lesion"
# The weight-free classical tool is the app's default; without it the MedSAM2 adapter runs with random weights, whose
# masks are noise: then only the geometry of the answer is checked, not that the mask holds the click.
TOOL = "classical" if importlib.util.find_spec("ibisagent.tools.classical") else "medsam2"

pytestmark = [
    pytest.mark.skipif(not (DEMO.is_dir() and RECIST.is_dir()), reason=f"shared data not found at {DEMO.parent}"),
    pytest.mark.skipif(not (APP / "main.py").is_file(), reason=f"the MONAI Label app is missing at {APP}"),
]


def _build_studies(root: Path) -> dict:
    """One demo PNG and a NIfTI volume from a RECIST npz (imgs D x H x W saved as (W, H, D): voxel (i, j, k) =
    column, row, slice), plus the lesion's slice and an inner point of it."""
    root.mkdir()
    shutil.copyfile(DEMO / "demo" / f"{PNG_ID}.png", root / f"{PNG_ID}.png")
    npz = np.load(sorted(RECIST.glob("*.npz"))[0])
    imgs, gts = np.transpose(npz["imgs"], (2, 1, 0)), np.transpose(npz["gts"], (2, 1, 0)) > 0
    nib.save(nib.Nifti1Image(imgs, np.diag([*np.asarray(npz["spacing"], float), 1.0])), root / f"{VOLUME_ID}.nii.gz")
    from scipy.ndimage import distance_transform_edt

    k = int(np.argmax(gts.sum(axis=(0, 1))))
    depth = distance_transform_edt(gts[:, :, k])
    i, j = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return {"shape": imgs.shape, "imgs": imgs, "k": k, "click": [int(i), int(j), k]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A bare server (no --conf model) in its own process group; only that group is ended at teardown."""
    tmp = tmp_path_factory.mktemp("slicer_client_server")
    studies = tmp / "studies"
    data = _build_studies(studies)
    monailabel = find_monailabel(VENV_BIN)
    if monailabel is None:
        pytest.skip(f"no monailabel command beside {sys.executable} or on PATH")
    with running_server(tmp, studies, monailabel, {"tool": TOOL}) as (url, log):
        client = IBISAgentClient(url, timeout=5, infer_timeout=300)
        yield {"client": client, "studies": studies, "log": log, **data}


def _decode(result: dict) -> TrajectoryView:
    """The module's reading of the trajectory, checked against the core's reading of the same JSON."""
    view = TrajectoryView.from_dict(result["trajectory"])
    core = Trajectory.from_dict(result["trajectory"])
    np.testing.assert_array_equal(view.final_mask, core.final_mask)
    assert view.num_steps == len(core.steps)
    return view


def test_info_lists_the_task(server):
    info = server["client"].info()
    task = info["models"]["ibisagent"]
    assert task["dimension"] == 2
    assert task["config"]["run_agent"] is False  # no model: the Logic then sends only the user's points
    assert server["client"].has_image(VOLUME_ID) and not server["client"].has_image("no-such-image")


@pytest.mark.parametrize("axis", [2, 1, 0])
def test_tool_only_ijk_click_gives_a_volume_label_in_that_slice(server, axis):
    client, shape = server["client"], server["shape"]
    click = list(server["click"])  # (i, j, k) inside the lesion on its axial slice
    s = click[axis]
    params = AgentRequest("segment the lesion", slice=s, axis=axis, foreground=[click], max_steps=1, run_agent=False)
    result, label = client.infer(VOLUME_ID, params.to_params())  # output=all: the JSON and the label file, multipart
    assert (result["slice"], result["axis"], result["label_kind"]) == (s, axis, "volume")
    assert result["stop_reason"] == "agent_not_run" and result["image"] == VOLUME_ID
    view = _decode(result)
    assert view.image_size == slice_shape(shape, axis)
    labelmap, _ = read_nifti(label)  # (K, J, I), as arrayFromVolume would hold it in Slicer
    assert labelmap.shape == shape[::-1]
    np.testing.assert_array_equal(kji_slice(labelmap, axis, s) > 0, view.final_mask)
    assert int(np.count_nonzero(labelmap)) == int(view.final_mask.sum())  # nothing outside the slice
    # the server's click is the voxel's pixel, and the module shows it back on that voxel
    (c,) = view.clicks_at(0)
    assert c.positive and (int(c.x), int(c.y)) == tuple(v for a, v in enumerate(click) if a != axis)
    np.testing.assert_array_equal(pixel_to_voxel_centre((c.x, c.y), axis, s), click)
    # the server's slice image is the module's kji_slice of the same voxels (what the user sees is what it segments)
    assert view.image_size == kji_slice(ijk_array_to_kji(server["imgs"]), axis, s).shape
    if TOOL == "classical":
        assert labelmap[click[2], click[1], click[0]] == 1


def test_continuation_with_session_undo_to_and_remove_clicks(server):
    client, (i, j, k) = server["client"], server["click"]

    def infer(**fields):
        request = AgentRequest("segment the lesion", slice=k, axis=2, max_steps=1, run_agent=False, **fields)
        return client.infer(VOLUME_ID, request.to_params(), output="json")

    first, label = infer(foreground=[[i, j, k]])
    assert label is None and first["session_id"]
    sid = first["session_id"]
    second, _ = infer(session_id=sid, background=[[i + 25, j, k]])
    assert second["session_id"] == sid
    view = _decode(second)
    assert view.num_steps == 2
    assert [(int(c.x), int(c.y), c.positive) for c in view.clicks_at(1)] == [(i, j, True), (i + 25, j, False)]
    # undo_to 1 keeps the first step; the new point becomes step 2
    third, _ = infer(session_id=sid, undo_to=1, foreground=[[i, j + 3, k]])
    view = _decode(third)
    assert view.num_steps == 2
    assert [(int(c.x), int(c.y)) for c in view.clicks_at(1)] == [(i, j), (i, j + 3)]
    np.testing.assert_array_equal(view.mask_at(0), _decode(first).final_mask)
    # undo_to 0: back to the initial state, then one new step
    fourth, _ = infer(session_id=sid, undo_to=0, foreground=[[i, j, k]])
    view = _decode(fourth)
    assert view.num_steps == 1 and [(int(c.x), int(c.y)) for c in view.clicks_at(0)] == [(i, j)]
    # a second click, then the first one taken back (as [x, y] pixels, the way the trajectory shows it)
    infer(session_id=sid, foreground=[[i + 2, j + 2, k]])
    fifth, _ = infer(session_id=sid, remove_clicks=[[i, j]])
    view = _decode(fifth)
    assert [(int(c.x), int(c.y)) for c in view.clicks_at(view.num_steps - 1)] == [(i + 2, j + 2)]


@pytest.mark.parametrize(
    ("image", "params", "status", "words"),
    [
        ("no-such-image", {"instruction": "x", "foreground": [[1, 1]], "run_agent": False}, 404, "unknown image id"),
        (
            VOLUME_ID,
            {"instruction": "x", "slice": 999, "run_agent": False, "foreground": [[1, 1]]},
            400,
            "out of range",
        ),
        (VOLUME_ID, {"instruction": "x", "slice": 3, "axis": 5, "run_agent": False}, 400, "axis must be 0, 1 or 2"),
        (VOLUME_ID, {"instruction": "x", "slice": 3, "foreground": [[1, 1, 4]], "run_agent": False}, 400, "slice 4"),
        (VOLUME_ID, {"session_id": "0" * 32, "run_agent": False, "foreground": [[1, 1]]}, 404, "is unknown"),
        (VOLUME_ID, {"instruction": "segment the lesion", "slice": 3}, 400, "no policy model configured"),
    ],
)
def test_errors_carry_the_status_and_the_servers_message(server, image, params, status, words):
    with pytest.raises(IBISAgentClientError) as info:
        server["client"].infer(image, params, output="json")
    assert info.value.status == status
    assert words in info.value.server_message and words in str(info.value)


def test_upload_a_volume_then_segment_it(server, tmp_path):
    """What the Logic does with a volume the server does not have: write it as NIfTI from the (K, J, I) array
    (IBISAgentLib's writer), PUT it into the datastore, then infer on it, with a PNG initial mask."""
    client = server["client"]
    rng = np.random.default_rng(5)
    kji = (rng.normal(size=(7, 40, 50)) * 50 + 100).astype(np.int16)  # dims (I, J, K) = (50, 40, 7)
    kji[3, 10:30, 15:35] += 400  # a bright block on slice k = 3
    ijk_to_ras = np.array([[0.0, -0.9, 0.0, 5.0], [0.8, 0.0, 0.0, -3.0], [0.0, 0.0, 3.0, 12.0], [0, 0, 0, 1]])
    path = write_nifti(tmp_path / "slicer-upload-test.nii.gz", kji, ijk_to_ras)
    image_id = client.upload_image(path, "slicer-upload-test")
    assert image_id == "slicer-upload-test" and client.has_image(image_id)
    stored = nib.load(str(server["studies"] / "slicer-upload-test.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(stored.dataobj), kji_array_to_ijk(kji))  # voxel (i, j, k) kept

    initial = np.zeros(slice_shape((50, 40, 7), 2), bool)  # (H, W) = (40, 50)
    initial[12:20, 18:30] = True
    label_path = tmp_path / "initial.png"
    label_path.write_bytes(png_mask_bytes(initial))
    params = AgentRequest("segment the block", slice=3, axis=2, foreground=[[25, 20, 3]], run_agent=False)
    result, label = client.infer(image_id, params.to_params(has_label=True), label_path=label_path)
    view = _decode(result)
    np.testing.assert_array_equal(view.initial_mask(), initial)
    labelmap, affine = read_nifti(label)
    assert labelmap.shape == kji.shape
    np.testing.assert_allclose(affine, ijk_to_ras, atol=1e-5)
    np.testing.assert_array_equal(kji_slice(labelmap, 2, 3) > 0, view.final_mask)
    if TOOL == "classical":
        assert view.final_mask[20, 25]


def test_png_image_answers_a_2d_label(server):
    from PIL import Image

    params = {"instruction": "segment the liver", "foreground": [[400, 500]], "run_agent": False}
    result, label = server["client"].infer(PNG_ID, params)
    assert result["label_kind"] == "2d" and result["slice"] is None
    view = _decode(result)
    import io

    with Image.open(io.BytesIO(label)) as im:
        np.testing.assert_array_equal(np.asarray(im) > 0, view.final_mask)


def test_the_token_is_sent_to_a_server_that_needs_one(tmp_path):
    """A server started with IBISAGENT_API_TOKEN answers 401 without it; the client sends it (argument or the
    environment variable)."""
    from tests.monailabel_app.attack import TOKEN, build, start

    build(tmp_path)
    server = start(tmp_path, "token")
    try:
        with pytest.raises(IBISAgentClientError) as info:
            IBISAgentClient(server.url, token="").info()
        assert info.value.status == 401 and "Bearer" in info.value.server_message
        assert "ibisagent" in IBISAgentClient(server.url, token=TOKEN).info()["models"]
    finally:
        server.stop()
