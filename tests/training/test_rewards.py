"""The five RL rewards on hand-made cases: formats of both dialects, IoU tiers at their boundaries, clicks in and out
of the error regions, progress, length, totals, trl's plain and conversational completions, and VQA rows."""

from __future__ import annotations

import numpy as np
import pytest

from ibisagent.episode import Episode
from ibisagent.grammar import Grammar
from ibisagent.loop import run_episode
from ibisagent.policies.replay import ReplayPolicy
from ibisagent.trajectory import Step, Trajectory
from ibisagent.types import Action, Click
from ibisagent_training import rewards as R
from ibisagent_training.rewards import (
    COMPONENTS,
    RewardConfig,
    answer_match,
    answer_reward,
    click_hits,
    click_placement,
    click_reward,
    format_reward,
    format_score,
    iou_tier,
    length_reward,
    length_score,
    progress,
    progress_reward,
    reward_functions,
    reward_weights,
    step_rewards,
    total_reward,
    trajectory_rewards,
)

IBIS = Grammar("ibis")
RELEASED = Grammar("released")
SIZE = (20, 20)


def _click_text(x: float, y: float, positive: bool = True, target: str = "ring", grammar: Grammar = IBIS) -> str:
    """A well-formed turn clicking pixel centre (x, y) of a 20x20 image."""
    return grammar.format(Action((Click(x, y, positive, target),)), SIZE, think="look")


def _terminate(answer: str | None = "Done.") -> str:
    return IBIS.format(Action(terminate=True), SIZE, think="done", answer=answer)


def _square(r0: int, r1: int, c0: int, c1: int, size=SIZE) -> np.ndarray:
    m = np.zeros(size, bool)
    m[r0:r1, c0:c1] = True
    return m


# -- format ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, dialect, expected",
    [
        ("<think>\nx\n</think>\n<action>\nring: positive (0.5000, 0.2500)\n</action>", "ibis", 1.0),
        ("<think>\nx\n</think>\n<action>\nPositive Point (0.5000, 0.2500)\n</action>", "released", 1.0),
        ("<think>\nx\n</think>\n<action>\nNegative Point (0.1, 0.9)\n</action>", "ibis", 1.0),  # released lines parse
        ("<think>\nx\n</think>\n<action>\nring: positive (0.5, 0.25)\n</action>", "released", 0.0),  # not vice versa
        (
            "<think>\nx\n</think>\n<action>\nring: positive (0.5, 0.25)\nbone: negative (0.1, 0.2)\n</action>",
            "ibis",
            1.0,
        ),
        ("<think>\n\n</think>\n<action>\nTerminate\n</action>\n<answer>\nDone.\n</answer>", "ibis", 1.0),
        ("<think>\n\n</think>\n<action>\nTermination\n</action>\n<answer>\nok\n</answer>", "released", 1.0),
        ("<think>\nx\n</think>\n<action>\nTerminate\n</action>", "ibis", 0.0),  # Terminate needs an <answer>
        ("<think>\nx\n</think>\n<action>\nUndo\n</action>", "ibis", 1.0),
        ("<think>\nx\n</think>\n<action>\nring: positive (0.5, 0.5)\n</action>\n<answer>\nx\n</answer>", "ibis", 0.0),
        ("<action>\nring: positive (0.5, 0.5)\n</action>", "ibis", 0.0),  # no <think>
        ("<action>\nring: positive (0.5, 0.5)\n</action>\n<think>\nx\n</think>", "ibis", 0.0),  # wrong order
        (
            "<think>\nx\n</think>\n<action>\nring: positive (0.5, 0.5)\n</action>\n<action>\nUndo\n</action>",
            "ibis",
            0.0,
        ),
        ("<think>\nx\n</think>\n<action>\nring: positive (0.5, 0.5)\n</action> and more", "ibis", 0.0),
        ("Sure! <think>\nx\n</think>\n<action>\nring: positive (0.5, 0.5)\n</action>", "ibis", 0.0),
        ("<think>\nx\n</think>\n<action>\nring: positive (1.5, 0.5)\n</action>", "ibis", 0.0),  # out of range
        ("<think>\nx\n</think>\n<action>\nring: maybe (0.5, 0.5)\n</action>", "ibis", 0.0),
        ("<think>\nx\n</think>\n<action>\n\n</action>", "ibis", 0.0),  # empty action
        ("<think>\nx\n<action>\nring: positive (0.5, 0.5)\n</action>", "ibis", 0.0),  # unclosed think
        ("<think>\nx\n</think>\n<action>\nTerminate\nring: positive (0.5, 0.5)\n</action>", "ibis", 0.0),
        ("", "ibis", 0.0),
    ],
)
def test_format_score(text, dialect, expected):
    assert format_score(text, dialect) == expected


def test_format_score_rejects_non_text_and_checks_the_authors_layout_when_asked():
    assert format_score(None) == 0.0
    loose = "<think>x</think> <action>ring: positive (0.5, 0.5)</action>"
    assert format_score(loose) == 1.0
    assert format_score(loose, strict_layout=True) == 0.0
    for grammar, action in ((IBIS, Action((Click(3.5, 4.5, True, "ring"),))), (RELEASED, Action(terminate=True))):
        text = grammar.format(action, SIZE, think="reason", answer="a" if action.terminate else None)
        assert format_score(text, grammar.dialect, strict_layout=True) == 1.0


def test_format_reward_takes_plain_and_conversational_completions():
    good = _click_text(3.5, 4.5)
    completions = [good, "click the ring", [{"role": "assistant", "content": good}]]
    assert format_reward(completions) == [1.0, 0.0, 1.0]
    parts = [[{"role": "assistant", "content": [{"type": "text", "text": good}]}]]
    assert format_reward(parts) == [1.0]
    # a multi-turn conversational completion: one good and one bad assistant turn, tool messages skipped
    multi = [
        {"role": "assistant", "content": good},
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "<action>"}]},
        {"role": "assistant", "content": "oops"},
    ]
    assert format_reward([multi]) == [0.5]
    released = RewardConfig(dialect="released")
    assert format_reward([good, _click_text(3.5, 4.5, grammar=RELEASED)], config=released) == [0.0, 1.0]


def test_completion_text_rejects_unknown_shapes():
    with pytest.raises(TypeError, match="string or a list of messages"):
        R.completion_text(42)
    with pytest.raises(TypeError, match="role"):
        R.completion_text([{"text": "no content key"}])


# -- final answer ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [(1.0, 3.0), (0.81, 3.0), (0.8, 2.0), (0.71, 2.0), (0.7, 1.0), (0.51, 1.0), (0.5, 0.0), (0.0, 0.0)],
)
def test_iou_tiers_are_strict_at_their_boundaries(value, expected):
    assert iou_tier(value) == expected


def test_iou_tier_from_masks_at_the_boundaries():
    gt = _square(0, 2, 0, 5)  # 10 pixels; a prediction of its first k pixels has IoU k / 10 exactly
    flat = np.flatnonzero(gt.ravel())
    expected = {10: 3.0, 9: 3.0, 8: 2.0, 7: 1.0, 6: 1.0, 5: 0.0, 0: 0.0}
    for k, tier in expected.items():
        pred = np.zeros(gt.size, bool)
        pred[flat[:k]] = True
        rows = step_rewards(_terminate(), gt_mask=gt, prev_mask=pred.reshape(gt.shape))
        assert rows["iou"] == k / 10 and rows["answer"] == tier, k


def test_custom_tiers():
    cfg = RewardConfig(iou_thresholds=[0.9, 0.3], iou_rewards=[1.0, 0.5], iou_floor_reward=-1.0)
    assert [iou_tier(v, cfg) for v in (0.95, 0.9, 0.31, 0.3)] == [1.0, 0.5, 0.5, -1.0]


@pytest.mark.parametrize(
    "pred, truth, expected",
    [
        ("Yes", "yes", True),
        ("  yes. ", "Yes", True),
        ("Yes, it is.", "yes", True),
        ("No", "yes", False),
        ("yesterday", "yes", False),
        ("B", "B", True),
        ("b.", "B", True),
        ("(B)", "b", True),
        ("B. Left lung", "B", True),
        ("B) left lung", "b. left lung", True),
        ("C. Left lung", "B. Left lung", False),
        ("C", "B", False),
        ("left lung", "B. Left lung", True),
        ("C. Pneumonia", "pneumonia", True),
        ("a cyst", "a", False),
        ("Pneumonia", "pneumonia!", True),
        ("right   lower lobe", "Right lower lobe", True),
        ("right lobe", "right lower lobe", False),
        (None, "yes", False),
    ],
)
def test_answer_match(pred, truth, expected):
    assert answer_match(pred, truth) is expected


def test_answer_match_refuses_an_empty_truth():
    with pytest.raises(ValueError, match="solution"):
        answer_match("yes", " . ")


def test_answer_reward_on_vqa_and_segmentation_rows():
    gt = _square(5, 10, 5, 10)
    answers = [_terminate("B. Cyst"), _terminate("C"), "no tags at all", _terminate()]
    out = answer_reward(
        answers, solution=["b", "b", "b", None], gt_mask=[None, None, None, gt], prev_mask=[None] * 3 + [gt]
    )
    assert out == [1.0, 0.0, 0.0, 3.0]
    # neither a solution nor a mask: the reward does not apply
    assert answer_reward([_terminate()]) == [None]
    # conversational VQA completion
    assert answer_reward([[{"role": "assistant", "content": _terminate("yes")}]], solution=["Yes."]) == [1.0]


# -- click placement ------------------------------------------------------------------------------------------------


def test_click_hits_use_x_as_column_and_y_as_row():
    gt = np.zeros(SIZE, bool)
    gt[2, 7] = True  # row 2, column 7
    empty = np.zeros(SIZE, bool)
    assert click_hits([Click(7.5, 2.5, True)], empty, gt) == [True]
    assert click_hits([Click(2.5, 7.5, True)], empty, gt) == [False]


def test_click_placement_regions_of_the_previous_mask():
    gt = _square(0, 10, 0, 10)
    prev = _square(5, 15, 5, 15)  # FN: gt minus prev (e.g. (2, 2)); FP: prev minus gt (e.g. (12, 12)); TP: (7, 7)
    cases = [
        (Click(2.5, 2.5, True), 1.0),  # positive in FN
        (Click(7.5, 7.5, True), -1.0),  # positive on pixels already segmented
        (Click(17.5, 17.5, True), -1.0),  # positive on background
        (Click(12.5, 12.5, False), 1.0),  # negative in FP
        (Click(2.5, 2.5, False), -1.0),  # negative on missed target
        (Click(7.5, 7.5, False), -1.0),  # negative on correct pixels
        (Click(17.5, 17.5, False), -1.0),  # negative on untouched background
    ]
    for click, expected in cases:
        assert click_placement([click], prev, gt) == expected, click
    assert click_placement([Click(2.5, 2.5, True), Click(17.5, 17.5, True)], prev, gt) == 0.0
    assert click_placement([c for c, _ in cases], prev, gt) == pytest.approx((2 - 5) / 7)
    assert click_placement([], prev, gt) is None
    cfg = RewardConfig(click_bonus=0.5, click_penalty=0.0)
    assert click_placement([Click(2.5, 2.5, True), Click(17.5, 17.5, True)], prev, gt, cfg) == 0.25


def test_click_placement_per_target():
    gts = {"liver": _square(0, 5, 0, 5), "kidney": _square(10, 15, 10, 15)}
    clicks = [Click(2.5, 2.5, True, "liver"), Click(2.5, 2.5, True, "kidney"), Click(12.5, 12.5, True, "spleen")]
    assert click_hits(clicks, {}, gts) == [True, False, False]


def test_click_reward_step_level_rows():
    gt = _square(0, 10, 0, 10)
    prev = _square(5, 15, 5, 15)
    hit, miss = _click_text(2.5, 2.5), _click_text(17.5, 17.5)
    neg_hit = _click_text(12.5, 12.5, positive=False, grammar=RELEASED)
    out = click_reward(
        [hit, miss, _terminate(), "garbage", hit],
        gt_mask=[gt] * 5,
        prev_mask=[prev] * 5,
        pred_mask=[prev] * 5,
        solution=[None, None, None, None, "yes"],
    )
    assert out == [1.0, -1.0, None, None, 1.0]
    # released dialect, a negative click in the FP region; conversational completion
    cfg = RewardConfig(dialect="released")
    conv = [[{"role": "assistant", "content": neg_hit}]]
    assert click_reward(conv, config=cfg, gt_mask=[gt], prev_mask=[prev], pred_mask=[prev & ~gt]) == [1.0]


def test_click_on_a_vqa_row_is_a_penalty():
    out = click_reward([_click_text(2.5, 2.5), _terminate("yes")], solution=["yes", "yes"])
    assert out == [-1.0, None]


# -- progress and length --------------------------------------------------------------------------------------------


def test_progress():
    assert progress([0.0, 0.6, 0.6, 0.8]) == pytest.approx(2 / 3)
    assert progress([0.5, 0.4]) == 0.0
    assert progress([0.5, 0.5 + 1e-9]) == 1.0
    assert progress([0.5]) is None
    assert progress([]) is None


def test_progress_reward_step_level_rows():
    gt = _square(0, 10, 0, 10)
    prev = _square(0, 4, 0, 10)  # IoU 0.4
    better, same = _square(0, 6, 0, 10), prev.copy()  # IoU 0.6, 0.4
    text = _click_text(5.5, 5.5)
    out = progress_reward(
        [text, text, _terminate(), "garbage", _terminate("yes")],
        gt_mask=[gt, gt, gt, gt, None],
        prev_mask=[prev] * 4 + [None],
        pred_mask=[better, same, None, None, None],
        solution=[None] * 4 + ["yes"],
    )
    assert out == [1.0, 0.0, None, 0.0, None]


@pytest.mark.parametrize("steps, expected", [(0, 1.0), (1, 1.0), (5, 1.0), (6, 0.8), (7, 0.6), (10, 0.0), (12, -0.4)])
def test_length_score(steps, expected):
    assert length_score(steps) == pytest.approx(expected)


def test_length_score_floor_and_validation():
    assert length_score(20, RewardConfig(length_floor=0.0)) == 0.0
    assert length_score(3, RewardConfig(optimal_steps=2, length_decay=0.5, length_bonus=2.0)) == 1.5
    with pytest.raises(ValueError, match="num_steps"):
        length_score(-1)


def test_length_reward_uses_the_step_index():
    assert length_reward(["x", "y"], step_index=[0, 6]) == pytest.approx([1.0, 0.6])


# -- totals and configuration ---------------------------------------------------------------------------------------


def test_total_reward_is_the_weighted_mean_and_skips_none():
    comps = {"format": 1.0, "answer": 3.0, "click": 1.0, "progress": 1.0, "length": 1.0}
    assert total_reward(comps) == pytest.approx(1.4)
    assert total_reward({**comps, "click": None, "progress": None}) == pytest.approx(1.0)
    cfg = RewardConfig(answer_weight=2.0, total_divisor=1.0)
    assert total_reward(comps, cfg) == pytest.approx(10.0)


def test_reward_config_validation_and_from_dict():
    with pytest.raises(ValueError, match="same length"):
        RewardConfig(iou_thresholds=[0.5], iou_rewards=[1.0, 2.0])
    with pytest.raises(ValueError, match="descending"):
        RewardConfig(iou_thresholds=[0.5, 0.8], iou_rewards=[1.0, 2.0])
    with pytest.raises(ValueError, match="dialect"):
        RewardConfig(dialect="xml")
    with pytest.raises(ValueError, match="unknown reward option"):
        RewardConfig.from_dict({"gamma": 0.3})
    cfg = RewardConfig.from_dict({"iou_thresholds": (0.9, 0.5), "iou_rewards": (2, 1), "length_decay": 0.1})
    assert cfg.iou_rewards == [2.0, 1.0] and cfg.length_decay == 0.1


def test_reward_config_parses_from_the_command_line():
    transformers = pytest.importorskip("transformers")
    (cfg,) = transformers.HfArgumentParser(RewardConfig).parse_args_into_dataclasses(
        ["--iou_thresholds", "0.9", "0.6", "--iou_rewards", "2", "1", "--length_floor", "-1", "--dialect", "released"]
    )
    assert cfg.iou_thresholds == [0.9, 0.6] and cfg.iou_rewards == [2.0, 1.0]
    assert cfg.length_floor == -1.0 and cfg.dialect == "released"


def test_bound_reward_functions_and_weights_reproduce_the_total():
    gt = _square(0, 10, 0, 10)
    prev = _square(0, 4, 0, 10)
    pred = _square(0, 9, 0, 10)  # IoU 0.9
    text = _click_text(5.5, 5.5)
    kwargs = dict(gt_mask=[gt], prev_mask=[prev], pred_mask=[pred], step_index=[2], trainer_state=None)
    funcs = reward_functions()
    assert [f.__name__ for f in funcs] == [f"{c}_reward" for c in COMPONENTS]
    values = [f([text], **kwargs)[0] for f in funcs]
    assert values == [1.0, 3.0, 1.0, 1.0, 1.0]
    weighted = sum(w * v for w, v in zip(reward_weights(), values))
    assert weighted == pytest.approx(step_rewards(text, gt, prev, pred, step_index=2)["total"]) == pytest.approx(1.4)
    strict = reward_functions(RewardConfig(click_penalty=-2.0))
    assert strict[2]([_click_text(15.5, 15.5)], **kwargs) == [-2.0]


def test_columns_must_have_one_value_per_completion():
    with pytest.raises(ValueError, match="one per completion"):
        progress_reward(["a", "b"], gt_mask=[None, None, None])


# -- step-level rows ------------------------------------------------------------------------------------------------


def test_step_rewards_components():
    gt = _square(0, 10, 0, 10)
    prev = _square(0, 4, 0, 10)
    pred = _square(0, 9, 0, 10)
    r = step_rewards(_click_text(5.5, 5.5), gt_mask=gt, prev_mask=prev, pred_mask=pred, step_index=0)
    assert {k: r[k] for k in COMPONENTS} == {"format": 1.0, "answer": 3.0, "click": 1.0, "progress": 1.0, "length": 1.0}
    assert r["iou"] == pytest.approx(0.9) and r["total"] == pytest.approx(1.4)
    # a Terminate keeps the previous mask (IoU 0.4): no tier, no click, progress does not apply
    t = step_rewards(_terminate(), gt_mask=gt, prev_mask=prev, step_index=6)
    assert (t["answer"], t["click"], t["progress"], t["length"]) == (0.0, None, None, pytest.approx(0.6))
    # an unusable completion: no mask, no answer
    bad = step_rewards("positive (0.5, 0.5)", gt_mask=gt, prev_mask=prev)
    assert (bad["format"], bad["answer"], bad["click"], bad["progress"]) == (0.0, 0.0, None, 0.0)
    with pytest.raises(ValueError, match="pred_mask"):
        step_rewards(_click_text(5.5, 5.5), gt_mask=gt, prev_mask=prev)


def test_step_rewards_accept_rle_and_list_masks():
    gt = _square(0, 10, 0, 10)
    from ibisagent.trajectory import encode_mask

    r = step_rewards(_terminate(), gt_mask=encode_mask(gt), prev_mask=gt.tolist())
    assert r["answer"] == 3.0
    with pytest.raises(ValueError, match="HxW"):
        step_rewards(_terminate(), gt_mask=np.zeros((2, 3, 4), bool))


def test_vqa_row_has_no_mask_rewards():
    r = step_rewards(_terminate("yes"), solution="Yes")
    assert r["answer"] == 1.0 and r["iou"] is None and r["progress"] is None and r["click"] is None
    assert r["length"] == 1.0 and r["format"] == 1.0


# -- trajectories ---------------------------------------------------------------------------------------------------


def _handmade_trajectory() -> tuple[Trajectory, np.ndarray]:
    """gt: rows 0-9, cols 0-9 of a 20x20 image. Step 0 clicks (2, 2) -> mask rows 0-9, cols 0-14 (IoU 2/3);
    step 1 is unusable; step 2 clicks negative at (12, 5) -> the exact gt (IoU 1); step 3 a positive click on the
    background that changes nothing; step 4 terminates."""
    gt = _square(0, 10, 0, 10)
    m1, m2 = _square(0, 10, 0, 15), gt.copy()
    c1, c2, c3 = Click(2.5, 2.5, True, "ring"), Click(12.5, 5.5, False, "ring"), Click(17.5, 17.5, True, "ring")
    steps = [
        Step(0, _click_text(2.5, 2.5), action=Action((c1,)), clicks={"ring": [c1]}, masks={"ring": m1}),
        Step(1, "not a turn", error="missing_tag: no <action>"),
        Step(2, _click_text(12.5, 5.5, False), action=Action((c2,)), clicks={"ring": [c1, c2]}, masks={"ring": m2}),
        Step(3, _click_text(17.5, 17.5), action=Action((c3,)), clicks={"ring": [c1, c2, c3]}, masks={"ring": m2}),
        Step(4, _terminate(), action=Action(terminate=True), answer="Done.", masks={"ring": m2}),
    ]
    traj = Trajectory("segment the ring", SIZE, ["ring"], steps=steps, answer="Done.", stop_reason="answer")
    return traj, gt


def test_trajectory_rewards_by_hand():
    traj, gt = _handmade_trajectory()
    r = trajectory_rewards(traj, {"ring": gt})
    assert r["format"] == pytest.approx(4 / 5)
    assert r["answer"] == 3.0 and r["iou"] == 1.0
    assert r["click"] == pytest.approx((1 + 1 - 1) / 3)
    assert r["progress"] == pytest.approx(2 / 4)  # acting steps 0-3: better, unusable, better, unchanged
    assert r["length"] == 1.0
    assert r["total"] == pytest.approx((0.8 + 3 + 1 / 3 + 0.5 + 1) / 5)
    # a single HxW ground truth belongs to the first target; the trl column path gives the same numbers
    assert trajectory_rewards(traj, gt) == r
    via_trl = [f([None], trajectory=[traj.to_dict()], gt_mask=[gt])[0] for f in reward_functions()]
    assert via_trl == pytest.approx([r[c] for c in COMPONENTS])


def test_trajectory_rewards_vqa_and_shape_checks():
    traj, gt = _handmade_trajectory()
    vqa = trajectory_rewards(traj, None, solution="done")
    assert vqa["answer"] == 1.0 and vqa["progress"] is None and vqa["iou"] is None
    # no mask is asked for (empty ground truth): positive clicks always miss; the negative click removes part of the
    # agent's own mask, which is the FP region, so it alone is a hit
    assert vqa["click"] == pytest.approx((-1 + 1 - 1) / 3)
    answered = Trajectory("Is there a cyst?", SIZE, ["target"], steps=[Step(0, _terminate("No"))], answer="No")
    a = trajectory_rewards(answered, None, solution="no")
    assert (a["answer"], a["click"], a["progress"], a["length"]) == (1.0, None, None, 1.0)
    with pytest.raises(ValueError, match="shape"):
        trajectory_rewards(traj, {"ring": np.zeros((5, 5), bool)})


def test_trajectory_rewards_of_a_real_episode(fake_tool):
    """Replay turns through the real loop and FakeTool; the loop's own per-step IoUs check the progress reward."""
    size = (40, 40)
    yy, xx = np.ogrid[:40, :40]
    gt = (yy - 20.5) ** 2 + (xx - 20.5) ** 2 <= 64
    texts = [
        IBIS.format(Action((Click(26.5, 20.5, True, "ring"),)), size, think="right part"),
        IBIS.format(Action((Click(14.5, 20.5, True, "ring"),)), size, think="left part"),
        "I am not sure.",
        IBIS.format(Action((Click(34.5, 20.5, False, "ring"),)), size, think="spill"),
        IBIS.format(Action((Click(1.5, 1.5, True, "ring"),)), size, think="corner"),
        IBIS.format(Action(terminate=True), size, think="done", answer="The ring is segmented."),
    ]
    image = np.zeros((40, 40, 3), np.uint8)
    traj = run_episode(
        ReplayPolicy(texts), Episode(fake_tool, image, ["ring"]), "segment the ring", {"ring": gt}, max_invalid=2
    )
    assert traj.stop_reason == "answer" and len(traj.steps) == 6
    r = trajectory_rewards(traj, {"ring": gt})
    assert r["format"] == pytest.approx(5 / 6)
    assert r["click"] == pytest.approx((1 + 1 + 1 - 1) / 4)
    ious, prev = [0.0], 0.0
    for s in traj.steps[:-1]:  # the acting steps; the unusable one keeps the previous IoU
        prev = s.metrics.get("iou/ring", prev)
        ious.append(prev)
    expected = np.mean([b > a for a, b in zip(ious[:-1], ious[1:])])
    assert r["progress"] == pytest.approx(expected)
    assert r["iou"] == pytest.approx(traj.steps[-1].metrics["iou/ring"])
    assert r["answer"] == iou_tier(r["iou"]) and r["length"] == pytest.approx(0.8)
