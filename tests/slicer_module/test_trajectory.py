"""IBISAgentLib.trajectory reads what the core writes: trajectories made by the real `ibisagent` loop (oracle and
replay policies, a tool, several targets, an initial mask, unparsable outputs), serialised to JSON and decoded with
the Slicer library, compare mask for mask and click for click."""

from __future__ import annotations

import json

import numpy as np
import pytest
from IBISAgentLib import trajectory as lib

from ibisagent.episode import Episode
from ibisagent.loop import run_episode
from ibisagent.policies import OraclePolicy, ReplayPolicy
from ibisagent.trajectory import Trajectory, encode_mask

H, W = 96, 128
IMAGE = np.full((H, W, 3), 90, np.uint8)


def disk(cy, cx, r):
    yy, xx = np.ogrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def through_json(trajectory: Trajectory) -> lib.TrajectoryView:
    return lib.TrajectoryView.from_json(json.dumps(trajectory.to_dict()))


def assert_same(view: lib.TrajectoryView, core: Trajectory):
    assert view.version == "1" and view.instruction == core.instruction
    assert view.image_size == tuple(core.image_size) and view.targets == core.targets
    assert view.stop_reason == core.stop_reason and view.answer == core.answer
    assert view.num_steps == len(core.steps)
    for n, (mine, theirs) in enumerate(zip(view.steps, core.steps)):
        assert mine.index == theirs.index and mine.text == theirs.text and mine.think == theirs.think
        assert mine.error == theirs.error and mine.answer == theirs.answer
        assert set(mine.masks_rle) == set(theirs.masks)
        for t, m in theirs.masks.items():
            np.testing.assert_array_equal(mine.mask(t), m)
        assert {t: [(c.x, c.y, c.positive, c.target) for c in cs] for t, cs in mine.clicks.items()} == {
            t: [(c.x, c.y, c.positive, c.target) for c in cs] for t, cs in theirs.clicks.items()
        }
        # the state after step n is the core's: the latest recorded masks at or before it, else the initial ones
        state = next((s.masks for s in reversed(core.steps[: n + 1]) if s.masks), None)
        if state is None:
            expected = np.zeros((H, W), bool)
            for m in core.initial_masks.values():
                expected |= m
        else:
            expected = np.logical_or.reduce([m for m in state.values()]) if state else np.zeros((H, W), bool)
        np.testing.assert_array_equal(view.mask_at(n), expected)
    np.testing.assert_array_equal(view.final_mask, core.final_mask)
    np.testing.assert_array_equal(view.mask_at(None), view.initial_mask())
    assert view.clicks_at(None) == [] and view.clicks_at(-1) == []


def test_oracle_trajectory_two_targets(fake_tool):
    gt = {"liver": disk(40, 50, 18), "tumor": disk(60, 100, 10)}
    episode = Episode(fake_tool, IMAGE, ["liver", "tumor"], max_steps=8)
    core = run_episode(OraclePolicy(gt, iou_threshold=0.6), episode, "segment the liver and the tumor", gt=gt)
    assert len(core.steps) >= 2 and core.final_mask.any() and core.stop_reason == "answer"
    view = through_json(core)
    assert_same(view, core)
    assert {c.target for c in view.steps[-2].all_clicks()} == {"liver", "tumor"}
    assert view.steps[0].describe().startswith("Step 0\nReasoning: ")
    assert "Action: " in view.steps[0].describe() and "positive" in view.steps[0].describe()
    assert f"Answer: {core.answer}" in view.steps[-1].describe() and "Action: terminate" in view.steps[-1].describe()
    # clicks are (x, y) pixels: each positive oracle click lies in its target's ground truth
    for c in view.clicks_at(view.num_steps - 1):
        assert gt[c.target][int(c.y), int(c.x)] == c.positive


def test_replay_trajectory_with_unparsable_step_and_initial_mask(fake_tool):
    init = disk(30, 30, 8)
    texts = [
        "<action>t: positive (0.5, 0.5)</action>",
        "this is not an action",
        "<action>t: negative (0.51, 0.5)</action>",
        "<action>Terminate</action>",
    ]
    episode = Episode(fake_tool, IMAGE, ["t"], initial_masks={"t": init}, max_steps=6)
    core = run_episode(ReplayPolicy(texts), episode, "refine it", max_invalid=2)
    assert core.steps[1].error and not core.steps[1].masks
    view = through_json(core)
    assert_same(view, core)
    np.testing.assert_array_equal(view.initial_mask(), init)
    np.testing.assert_array_equal(view.mask_at(1), view.mask_at(0))  # an unusable output keeps the state
    assert view.clicks_at(1) == view.clicks_at(0)
    assert "Unusable output: " in view.steps[1].describe() and "this is not an action" in view.steps[1].describe()
    assert [c.positive for c in view.clicks_at(2)] == [True, False]


def test_empty_trajectory_is_the_initial_state(fake_tool):
    core = Trajectory("x", (H, W), ["t"], initial_masks={"t": disk(10, 10, 4)})
    view = through_json(core)
    assert view.num_steps == 0 and view.steps == []
    np.testing.assert_array_equal(view.final_mask, core.final_mask)


def test_rle_matches_the_core_encoder():
    rng = np.random.default_rng(3)
    masks = [np.zeros((4, 5), bool), np.ones((4, 5), bool), rng.random((17, 23)) > 0.5, disk(40, 60, 20)]
    masks.append(np.pad(np.ones((2, 2), bool), 1))
    first = np.zeros((3, 3), bool)
    first[0, 0] = True  # starts with foreground: a zero-length background run first
    masks.append(first)
    for m in masks:
        core = encode_mask(m)
        assert lib.encode_rle(m) == core
        np.testing.assert_array_equal(lib.decode_rle(core), m)
    assert lib.encode_rle(first)["counts"][0] == 0


def test_unknown_version_and_bad_data_are_named():
    core = Trajectory("x", (4, 4), ["t"]).to_dict()
    with pytest.raises(lib.UnsupportedTrajectoryVersion, match="version '2' is not supported.*reads version"):
        lib.TrajectoryView.from_dict({**core, "version": "2"})
    with pytest.raises(lib.UnsupportedTrajectoryVersion, match="None"):
        lib.TrajectoryView.from_dict({k: v for k, v in core.items() if k != "version"})
    with pytest.raises(lib.TrajectoryFormatError, match="image_size"):
        lib.TrajectoryView.from_dict({**core, "image_size": "4x4"})
    with pytest.raises(lib.TrajectoryFormatError, match="counts sum to 3, expected 16"):
        lib.decode_rle({"size": [4, 4], "counts": [1, 2]})
    with pytest.raises(lib.TrajectoryFormatError, match="non-negative"):
        lib.decode_rle({"size": [2, 2], "counts": [5, -1]})
    bad_step = {"index": 0, "masks": {"t": {"size": [3, 3], "counts": [9]}}}
    with pytest.raises(
        lib.TrajectoryFormatError, match=r"steps\[0\].masks\['t'\] has size \[3, 3\], expected \[4, 4\]"
    ):
        lib.TrajectoryView.from_dict({**core, "steps": [bad_step]})
    with pytest.raises(lib.TrajectoryFormatError, match="a click needs x, y, positive"):
        lib.TrajectoryView.from_dict({**core, "steps": [{"index": 0, "clicks": {"t": [{"x": 1}]}}]})
    with pytest.raises(IndexError, match="out of range"):
        lib.TrajectoryView.from_dict(core).mask_at(0)
