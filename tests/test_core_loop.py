"""The loop, episode state, simulator, metrics and trajectory with a fake tool (loop logic only)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ibisagent.episode import Episode
from ibisagent.grammar import Grammar
from ibisagent.loop import run_episode
from ibisagent.metrics import dice, entity_f1, iou, iou_at, noc
from ibisagent.policies import OraclePolicy, ReplayPolicy
from ibisagent.render import MASK_ALPHA, MASK_COLOR, overlay
from ibisagent.simulator import next_click, next_clicks_multi
from ibisagent.trajectory import Trajectory, decode_mask, encode_mask
from ibisagent.types import Action, Click

H, W = 120, 160


def disk(cy, cx, r):
    yy, xx = np.ogrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


IMAGE = np.full((H, W, 3), 100, np.uint8)


def test_simulator_clicks_the_centre_of_the_larger_error():
    gt = disk(60, 80, 30)
    c = next_click(np.zeros((H, W), bool), gt)
    assert c.positive and c.pixel(H, W) == (60, 80)
    pred = gt | disk(10, 10, 25)  # a false positive blob touching the border, smaller in depth than 30
    c2 = next_click(pred, gt, [c])
    assert not c2.positive and pred[c2.pixel(H, W)] and not gt[c2.pixel(H, W)]
    assert next_click(gt, gt) is None


def test_simulator_border_padding_and_exclusion():
    gt = np.zeros((H, W), bool)
    gt[:, :40] = True  # a band on the left border: its deepest point is 20 px from the inner edge and the border
    c = next_click(np.zeros((H, W), bool), gt)
    assert 15 <= c.x <= 25
    again = next_click(np.zeros((H, W), bool), gt, [c])
    assert again.pixel(H, W) != c.pixel(H, W)


def test_simulator_multi_target():
    gts = {"a": disk(30, 30, 10), "b": disk(80, 120, 15)}
    clicks = next_clicks_multi({"a": gts["a"]}, gts)
    assert [c.target for c in clicks] == ["b"]


def test_metrics():
    a, b = disk(60, 80, 20), disk(60, 90, 20)
    inter, union = np.count_nonzero(a & b), np.count_nonzero(a | b)
    assert iou(a, b) == pytest.approx(inter / union)
    assert dice(a, b) == pytest.approx(2 * inter / (a.sum() + b.sum()))
    empty = np.zeros((H, W), bool)
    assert iou(empty, empty) == 1.0 and iou(a, empty) == 0.0
    assert noc([0.5, 0.86, 0.9], 0.85) == 2 and noc([0.5] * 20, 0.85) == 21
    assert iou_at([0.5, 0.9], 5) == 0.9
    assert entity_f1([(a, a), (b, disk(10, 10, 5)), (empty, a)]) == pytest.approx(2 / 5)


def test_rle_round_trip():
    for m in (disk(60, 80, 20), np.ones((H, W), bool), np.zeros((H, W), bool)):
        assert np.array_equal(decode_mask(json.loads(json.dumps(encode_mask(m)))), m)


def test_overlay_colour():
    mask = disk(60, 80, 20)
    out = overlay(IMAGE, mask)
    expected = np.round(100 * (1 - MASK_ALPHA) + np.array(MASK_COLOR) * MASK_ALPHA)
    assert np.allclose(out[60, 80], expected, atol=1) and (out[0, 0] == 100).all()
    with_markers = overlay(IMAGE, mask, [Click(80.5, 60.5, True)], marker_radius=6)
    assert not np.array_equal(with_markers, out)
    # uint8 images are blended through a table: every level of every channel as the float blend gives it
    levels = np.stack([np.arange(256), np.arange(256)[::-1], (np.arange(256) * 7) % 256], -1)[None].astype(np.uint8)
    half = np.arange(256)[None] % 2 == 0
    table = overlay(levels, half)
    assert np.array_equal(table, overlay(levels.astype(np.float32), half))
    assert np.array_equal(table[~half], levels[~half])


def test_oracle_episode_reaches_target_and_terminates(fake_tool):
    gt = {"lesion": disk(60, 80, 18)}
    ep = Episode(fake_tool, IMAGE, ["lesion"], max_steps=20)
    traj = run_episode(OraclePolicy(gt, iou_threshold=0.8), ep, "segment the lesion", gt=gt)
    assert traj.stop_reason == "answer" and traj.answer
    assert traj.steps[-1].action.terminate
    assert traj.steps[-2].metrics["iou/lesion"] >= 0.8
    assert fake_tool.encode_count == 1
    # JSON round trip keeps everything a consumer needs
    back = Trajectory.from_json(traj.to_json())
    assert [s.text for s in back.steps] == [s.text for s in traj.steps]
    assert np.array_equal(back.final_mask, traj.final_mask)
    assert back.steps[0].clicks["lesion"][0] == traj.steps[0].clicks["lesion"][0]


def test_observation_overlay_is_rendered_only_when_read(fake_tool, monkeypatch):
    """The overlay is what a policy reading `obs.image` sees, of the masks at its step; the oracle, which never reads
    it, renders none."""
    import ibisagent.loop as loop

    rendered = []
    monkeypatch.setattr(loop, "overlay", lambda image, mask: rendered.append(mask.copy()) or overlay(image, mask))
    gt = {"lesion": disk(60, 80, 18)}
    run_episode(OraclePolicy(gt, iou_threshold=0.8), Episode(fake_tool, IMAGE, ["lesion"]), "x", gt=gt)
    assert rendered == []

    seen = []

    class Looker(ReplayPolicy):
        def act(self, obs):
            seen.append((obs.image, obs.image, obs.masks["t"].copy()))
            return super().act(obs)

    ep = Episode(fake_tool, IMAGE, ["t"], max_steps=3)
    run_episode(Looker(["<action>t: positive (0.5, 0.5)</action>", "<action>Terminate</action>"]), ep, "x")
    assert len(rendered) == len(seen) == 2  # once per step, however often it is read
    for image, again, mask in seen:
        assert image is again and np.array_equal(image, overlay(IMAGE, mask))
    assert seen[1][2].any() and not np.array_equal(seen[0][0], seen[1][0])


def test_multi_target_oracle(fake_tool):
    gt = {"a": disk(40, 40, 28), "b": disk(80, 120, 28)}
    ep = Episode(fake_tool, IMAGE, list(gt), max_steps=20)
    traj = run_episode(OraclePolicy(gt, iou_threshold=0.7), ep, "segment a and b", gt=gt)
    first = traj.steps[0].action
    assert {c.target for c in first.clicks} == {"a", "b"}
    assert traj.stop_reason == "answer"


def test_invalid_output_stops_cleanly(fake_tool):
    ep = Episode(fake_tool, IMAGE, ["t"])
    traj = run_episode(ReplayPolicy(["garbage", "<action>t: positive (0.5, 0.5)</action>"]), ep, "x")
    assert traj.stop_reason == "invalid_action" and traj.steps[0].error.startswith("missing_tag")
    assert traj.steps[0].action is None and len(traj.steps) == 1


def test_invalid_output_retry_gets_feedback(fake_tool):
    seen = []

    class Recorder(ReplayPolicy):
        def act(self, obs):
            seen.append(obs.feedback)
            return super().act(obs)

    ep = Episode(fake_tool, IMAGE, ["t"], max_steps=3)
    traj = run_episode(
        Recorder(["garbage", "<action>t: positive (0.5, 0.5)</action>", "<action>Terminate</action>"]),
        ep,
        "x",
        max_invalid=2,
    )
    assert seen[0] is None and "missing_tag" in seen[1] and seen[2] is None
    assert traj.stop_reason == "terminate" and len(traj.steps) == 3


def test_repeated_action_and_step_limit(fake_tool):
    same = "<action>t: positive (0.5, 0.5)</action>"
    traj = run_episode(ReplayPolicy([same] * 5), Episode(fake_tool, IMAGE, ["t"]), "x")
    assert traj.stop_reason == "repeated_action" and len(traj.steps) == 2
    texts = [f"<action>t: positive (0.{i}, 0.5)</action>" for i in range(1, 9)]
    traj = run_episode(ReplayPolicy(texts), Episode(fake_tool, IMAGE, ["t"], max_steps=4), "x")
    assert traj.stop_reason == "max_steps" and len(traj.steps) == 4


def test_policy_crash_keeps_trajectory(fake_tool):
    class Boom:
        dialect = "ibis"

        def start(self, instruction, targets):
            pass

        def act(self, obs):
            raise RuntimeError("CUDA out of memory")

    traj = run_episode(Boom(), Episode(fake_tool, IMAGE, ["t"]), "x")
    assert traj.stop_reason == "policy_error" and "out of memory" in traj.meta["error"]


def test_undo_action_and_backtrack(fake_tool):
    ep = Episode(fake_tool, IMAGE, ["t"])
    g = Grammar("ibis")
    good, bad = Click(80.5, 60.5, True, "t"), Click(10.5, 10.5, True, "t")
    ep.apply(Action((good,)))
    after_good = ep.state.masks["t"].copy()
    ep.apply(Action((bad,)))
    assert ep.state.masks["t"].sum() > after_good.sum()
    ep.apply(g.parse("<action>Undo</action>", (H, W)).action)
    assert np.array_equal(ep.state.masks["t"], after_good) and ep.state.clicks["t"] == (good,)
    ep.undo_to(0)
    assert ep.step == 0 and not ep.state.masks["t"].any()
    with pytest.raises(ValueError, match="steps 0..0"):
        ep.undo_to(3)


def test_repeated_undo_walks_back_click_by_click(fake_tool):
    ep = Episode(fake_tool, IMAGE, ["t"], repeat_limit=0)
    a, b = Click(80.5, 60.5, True, "t"), Click(10.5, 10.5, True, "t")
    ep.apply(Action((a,)))
    after_a = ep.state.masks["t"].copy()
    ep.apply(Action((b,)))
    ep.apply(Action(undo=True))
    assert ep.state.clicks["t"] == (a,) and np.array_equal(ep.state.masks["t"], after_a)
    ep.apply(Action(undo=True))  # a second undo reverts the first click too, it does not redo the second
    assert ep.state.clicks["t"] == () and not ep.state.masks["t"].any()
    ep.apply(Action(undo=True))  # nothing left: no change
    assert ep.state.clicks["t"] == () and not ep.state.masks["t"].any()
    ep.undo_to(2)  # back to "a then b", and undo continues from there
    ep.apply(Action(undo=True))
    assert ep.state.clicks["t"] == (a,)


def test_undo_discards_a_wrong_initial_mask(fake_tool):
    wrong = disk(20, 20, 10)
    ep = Episode(fake_tool, IMAGE, ["t"], initial_masks={"t": wrong})
    ep.apply(Action(undo=True))
    assert not ep.union_mask().any() and ep.state.logits["t"] is None
    ep.apply(Action((Click(80.5, 60.5, True, "t"),)))
    assert not (ep.state.masks["t"] & wrong).any()  # the discarded mask is not fed back as a prior


def test_refinement_mode_initial_mask(fake_tool):
    init = disk(60, 80, 10)
    ep = Episode(fake_tool, IMAGE, ["t"], initial_masks={"t": init})
    assert np.array_equal(ep.union_mask(), init) and ep.state.logits["t"] is not None
    traj = run_episode(ReplayPolicy(["<action>Terminate</action>"]), ep, "refine")
    assert "t" in traj.initial_masks and np.array_equal(traj.final_mask, init)
    with pytest.raises(ValueError, match="shape"):
        Episode(fake_tool, IMAGE, ["t"], initial_masks={"t": np.zeros((5, 5), bool)})
