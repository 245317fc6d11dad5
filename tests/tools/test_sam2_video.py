"""The SAM2 video path (MedSAM2 settings, random weights) on a RECIST CT volume fed from memory: every slice covered
in both directions with the volume's orientation, a passed-through mask kept, image features encoded once per slice
(counted on the real image encoder), a corrected slice becomes a conditioning frame, re-propagation touches only the
slices beyond it, and the state is freed when the session ends."""

from __future__ import annotations

import numpy as np
import pytest

from ibisagent._compat import ensure_torchvision

ensure_torchvision()
torch = pytest.importorskip("torch", reason="the sam2 video path needs torch")
pytest.importorskip("sam2", reason="the sam2 video path needs the sam2 package")

from ibisagent.metrics import dice  # noqa: E402
from ibisagent.policies import OraclePolicy  # noqa: E402
from ibisagent.tools import ToolError  # noqa: E402
from ibisagent.tools.sam2_video import SAM2VideoPropagator  # noqa: E402
from ibisagent.volume import SliceStack, VolumeSession  # noqa: E402
from tests.conftest import RECIST  # noqa: E402
from tests.test_volume import GroundTruthTool, load_cropped, slice_masks  # noqa: E402

VOLUMES = sorted(RECIST.glob("*.npz")) if RECIST.is_dir() else []
pytestmark = pytest.mark.skipif(not VOLUMES, reason=f"RECIST volumes not found at {RECIST}")


@pytest.fixture(scope="module")
def propagator():
    p = SAM2VideoPropagator.from_checkpoint(None, medsam2=True)
    calls = {"n": 0}

    def count(module, args, output):
        calls["n"] += 1

    p.predictor.image_encoder.register_forward_hook(count)
    p.encoder_calls = calls
    yield p
    p.close()


@pytest.fixture(scope="module")
def volume():
    """Six slices around the largest lesion slice of a RECIST volume, cropped to a non-square in-plane size."""
    image, label = load_cropped(VOLUMES[1])
    key = int(np.argmax(label.sum((0, 1))))
    first = max(0, key - 3)
    image, label = image[:, :-7, first : first + 6], label[:, :-7, first : first + 6]
    assert image.shape[0] != image.shape[1]
    return image, label, key - first


def test_every_slice_in_both_directions_with_orientation_and_features_cached(propagator, volume):
    image, label, key = volume
    gts = slice_masks(label)
    stack = SliceStack(image, 2)
    propagator.set_volume(stack)
    start_calls = propagator.encoder_calls["n"]
    held = propagator.add_anchor(key, gts[key])
    assert held.shape == stack.shape == gts[key].shape
    assert dice(held, gts[key]) >= 0.98  # a mask passed through add_new_mask is kept
    up = list(propagator.propagate(key, 1, len(gts) - 1))
    down = list(propagator.propagate(key, -1, 0))
    assert [o.index for o in up] == list(range(key + 1, len(gts)))
    assert [o.index for o in down] == list(range(key - 1, -1, -1))
    for out in up + down:
        assert out.mask.shape == stack.shape and out.mask.dtype == bool and 0.0 <= out.score <= 1.0
    assert propagator.encode_count == len(gts) == propagator.encoder_calls["n"] - start_calls
    list(propagator.propagate(key, 1, len(gts) - 1))  # again: every slice's features come from the cache
    assert propagator.encoder_calls["n"] - start_calls == len(gts)

    # a corrected slice becomes a conditioning frame, and re-propagation from it touches only the slices beyond it
    state = propagator.state
    outputs = state["output_dict_per_obj"][0]
    corrected = key + 1
    assert corrected in outputs["non_cond_frame_outputs"]
    before = {t: out["pred_masks"].clone() for t, out in outputs["non_cond_frame_outputs"].items()}
    held = propagator.add_anchor(corrected, gts[corrected])
    assert dice(held, gts[corrected]) >= 0.98
    again = list(propagator.propagate(corrected, 1, len(gts) - 1))
    assert [o.index for o in again] == list(range(corrected + 1, len(gts)))
    assert corrected in outputs["cond_frame_outputs"]
    for t in range(0, corrected):
        if t in before:
            assert torch.equal(outputs["non_cond_frame_outputs"][t]["pred_masks"], before[t])
    propagator.remove_anchor(corrected)
    assert corrected not in outputs["cond_frame_outputs"]
    assert propagator.encoder_calls["n"] - start_calls == len(gts)


def test_volume_session_with_sam2_frees_its_state(propagator, volume):
    image, label, key = volume
    gts = slice_masks(label)
    images = [np.repeat(image[:, :, k].T[..., None], 3, 2) for k in range(image.shape[2])]
    session = VolumeSession(
        GroundTruthTool(images, gts),
        propagator,
        image,
        "Segment the lesion.",
        "lesion",
        absent_score=0.0,
        stop_after=99,
    )
    session.segment_key(key, policy=OraclePolicy({"lesion": gts[key]}))
    session.propagate()
    assert sorted(session.records) == list(range(len(gts)))  # random weights: never stop early
    repaired = key + 1
    changed = session.repair(repaired, policy=OraclePolicy({"lesion": gts[repaired]}))
    assert changed == list(range(repaired, len(gts)))
    assert session.records[repaired].status == "repaired"
    assert repaired in propagator.state["output_dict_per_obj"][0]["cond_frame_outputs"]
    session.close()
    assert propagator.state is None and propagator.encode_count == 0
    with pytest.raises(ToolError, match="set_volume"):
        list(propagator.propagate(key, 1, len(gts) - 1))
