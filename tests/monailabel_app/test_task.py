"""The ibisagent infer task in-process, with the fake tool and a replayed policy: how session edits (undo, removing
clicks after the agent undid a step) map onto the episode, and the label files of 2D NIfTI and JPG images."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monailabel")
nib = pytest.importorskip("nibabel")

from PIL import Image  # noqa: E402

from ibisagent.policies import ReplayPolicy  # noqa: E402
from ibisagent.trajectory import Trajectory  # noqa: E402
from monailabel_app.lib.errors import RequestError  # noqa: E402
from monailabel_app.lib.infers.ibisagent_task import IBISAgentTask  # noqa: E402
from monailabel_app.lib.request import IMAGE_ID_KEY, UPLOAD_KEY  # noqa: E402
from tests.conftest import FakeTool  # noqa: E402

H, W = 32, 48


def _click(x: int, y: int, positive: bool = True) -> str:
    """The model's text for one click at pixel (x, y) of the WxH image."""
    attribute = "positive" if positive else "negative"
    return f"<action>\nliver: {attribute} ({(x + 0.5) / W:.4f}, {(y + 0.5) / H:.4f})\n</action>"


A, B, C = (10, 8), (30, 20), (40, 5)
UNDO, TERMINATE = "<action>\nUndo\n</action>", "<action>\nTerminate\n</action>"


def _task(texts: list[str], tool: FakeTool | None = None) -> IBISAgentTask:
    return IBISAgentTask(
        tool=tool or FakeTool(radius=3),
        tool_factory=FakeTool,
        policy_factory=lambda: ReplayPolicy(texts),
        dialect="ibis",
        max_steps=10,
        session_ttl=60,
        max_sessions=8,
        embedding_cache=1,
        labels=["target"],
        server_info={},
    )


@pytest.fixture
def png(tmp_path) -> Path:
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), np.uint8)).save(path)
    return path


def _call(task: IBISAgentTask, path: Path, **params) -> tuple[dict, str]:
    label, result = task({"image": str(path), IMAGE_ID_KEY: path.stem, "model": "ibisagent", **params})
    return result, label


def _clicks(result: dict) -> list[tuple[int, int]]:
    trajectory = Trajectory.from_dict(result["trajectory"])
    last = next((s.clicks for s in reversed(trajectory.steps) if s.clicks), {})
    return [(int(c.x), int(c.y)) for cs in last.values() for c in cs]


def test_removing_clicks_after_the_agent_undid_a_step(png):
    # history: [] -> [A] -> [A, B] -> [A] (undo) -> [A, C] -> terminate
    task = _task([_click(*A), _click(*B), UNDO, _click(*C), TERMINATE])
    first, label = _call(task, png, instruction="segment the liver")
    os.remove(label)
    assert first["stop_reason"] == "terminate" and len(first["trajectory"]["steps"]) == 5
    assert _clicks(first) == [A, C]
    sid = first["session_id"]

    # C appeared with step 3: rewind to after step 2 (the undo), nothing to re-apply
    removed_c, label = _call(task, png, session_id=sid, remove_clicks=[list(C)], run_agent=False)
    os.remove(label)
    assert len(removed_c["trajectory"]["steps"]) == 3 and _clicks(removed_c) == [A]
    assert removed_c["trajectory"]["meta"]["user_steps"] == []

    # A has been there since step 0: rewind to the start, nothing else is left to re-apply
    removed_a, label = _call(task, png, session_id=sid, remove_clicks=[list(A)], run_agent=False)
    os.remove(label)
    assert removed_a["trajectory"]["steps"] == [] and _clicks(removed_a) == []
    assert removed_a["encode_count"] == first["encode_count"] == 1


def test_removing_an_early_click_re_applies_the_later_ones_as_a_user_step(png):
    task = _task([_click(*A), _click(*B), _click(*C), TERMINATE])
    first, label = _call(task, png, instruction="segment the liver")
    os.remove(label)
    result, label = _call(task, png, session_id=first["session_id"], remove_clicks=[list(B)], run_agent=False)
    steps = result["trajectory"]["steps"]
    assert len(steps) == 2 and result["trajectory"]["meta"]["user_steps"] == [1]  # step 0 (A) kept, then B, C - B
    assert _clicks(result) == [A, C]
    mask = np.asarray(Image.open(label)) > 0
    os.remove(label)
    assert mask[A[1], A[0]] and mask[C[1], C[0]] and not mask[B[1], B[0]]


def test_undo_to_counts_trajectory_steps_including_unparsable_ones(png):
    task = _task([_click(*A), "no action here"])
    first, label = _call(task, png, instruction="segment the liver", foreground=[list(B)])
    os.remove(label)
    # user step (B), agent A, agent text that could not be parsed (no action)
    assert [s["error"] is None for s in first["trajectory"]["steps"]] == [True, True, False]
    sid = first["session_id"]
    kept, label = _call(task, png, session_id=sid, undo_to=2, run_agent=False)
    os.remove(label)
    assert len(kept["trajectory"]["steps"]) == 2 and _clicks(kept) == [B, A]
    back, label = _call(task, png, session_id=sid, undo_to=1, foreground=[list(C)], run_agent=False)
    os.remove(label)
    assert _clicks(back) == [B, C] and back["trajectory"]["meta"]["user_steps"] == [0, 1]
    with pytest.raises(RequestError, match="undo_to=3 is out of range"):
        _call(task, png, session_id=sid, undo_to=3)


def test_a_2d_nifti_image_gives_a_2d_nifti_label_and_takes_a_slicer_shaped_upload(tmp_path):
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((W, H)).astype(np.float32), np.eye(4)), path)
    initial = np.zeros((W, H, 1), np.uint8)  # Slicer's labelmap of a 2D image: (i, j, 1)
    initial[5:9, 2:4, 0] = 1
    upload = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name  # as the app's /infer stores uploads
    nib.save(nib.Nifti1Image(initial, np.eye(4)), upload)
    try:
        result, label = _call(
            _task([]),
            path,
            instruction="segment the liver",
            **{UPLOAD_KEY: upload},
            foreground=[[20, 10]],
            run_agent=False,
        )
    finally:
        os.remove(upload)
    trajectory = Trajectory.from_dict(result["trajectory"])
    assert np.array_equal(trajectory.initial_masks["liver"], initial[..., 0].T > 0)
    data = np.asanyarray(nib.load(label).dataobj)
    os.remove(label)
    assert label.endswith(".nii.gz") and data.shape == (W, H) and result["label_kind"] == "2d"
    assert np.array_equal(data.T > 0, trajectory.final_mask) and data[20, 10] == 1


def test_a_label_path_written_into_params_is_never_read(png):
    result, label = _call(
        _task([]), png, instruction="segment the liver", label="/etc/hostname", foreground=[[3, 3]], run_agent=False
    )
    os.remove(label)
    assert result["trajectory"]["initial_masks"] == {} and result["trajectory"]["targets"] == ["/etc/hostname"]


def test_a_jpg_image_gives_a_png_label(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(path)
    result, label = _call(_task([]), path, instruction="segment the liver", foreground=[[7, 9]], run_agent=False)
    mask = np.asarray(Image.open(label))
    os.remove(label)
    assert label.endswith(".png") and mask.shape == (H, W) and mask[9, 7] == 1
