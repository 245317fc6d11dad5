"""The five rewards of agentic RL (paper Sec. 3.3 and Appendix C): format, final answer, region-based click placement,
progressive improvement and trajectory length, and their weighted total.

Two layers:

* pure helpers on our own types (`format_score`, `answer_match`, `iou_tier`, `click_placement`, `progress`,
  `length_score`) and two row-level entry points that compute every component at once: `trajectory_rewards` for a
  whole multi-turn `Trajectory`, `step_rewards` for one completion of a step-level row. Masks in, floats out: the
  caller runs the segmentation tool.
* trl reward functions, `(completions, **kwargs) -> list[float | None]`: `format_reward`, `answer_reward`,
  `click_reward`, `progress_reward`, `length_reward`. Each row is read from the dataset columns trl forwards as
  keyword lists: `trajectory` (a `Trajectory` or its dict, multi-turn mode) with `gt_mask` (HxW, the first
  target's) or `gt_masks` ({target: HxW}); or, for step-level rows, the completion's last assistant turn with
  `gt_mask`, `prev_mask`, `pred_mask`, `step_index`, `target`; `solution` holds a VQA row's ground-truth answer.
  `reward_functions(config)` binds a `RewardConfig` and `reward_weights(config)` gives the matching
  `GRPOConfig.reward_weights`.

A component is None where it does not apply (the IoU tier and progress on a VQA row, progress on a Terminate step);
trl turns None into NaN and ignores it, and `total_reward` counts it as 0. Masks are HxW bool arrays (nested lists and
trajectory RLE dicts are accepted too); clicks are `Click`s in pixels of the original image (x = column, y = row).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np

from ibisagent.grammar import ActionParseError, Grammar
from ibisagent.metrics import iou
from ibisagent.trajectory import Step, Trajectory, decode_mask
from ibisagent.types import DEFAULT_TARGET, Action, Click, ParsedOutput

COMPONENTS = ("format", "answer", "click", "progress", "length")


@dataclass(frozen=True)
class RewardConfig:
    """Weights and thresholds of the rewards; the defaults are the paper's / the authors' released values."""

    iou_thresholds: list[float] = field(
        default_factory=lambda: [0.8, 0.7, 0.5],
        metadata={"help": "IoU tiers of the segmentation answer reward, descending; IoU > threshold earns its reward"},
    )
    iou_rewards: list[float] = field(
        default_factory=lambda: [3.0, 2.0, 1.0],
        metadata={"help": "reward of each IoU tier (same length as iou_thresholds)"},
    )
    iou_floor_reward: float = field(default=0.0, metadata={"help": "segmentation answer reward below the last tier"})
    match_reward: float = field(default=1.0, metadata={"help": "close-ended VQA answer reward on an exact match"})
    click_bonus: float = field(default=1.0, metadata={"help": "click in the error region it corrects"})
    click_penalty: float = field(default=-1.0, metadata={"help": "click anywhere else"})
    progress_reward: float = field(default=1.0, metadata={"help": "step whose IoU strictly beats the previous one"})
    length_bonus: float = field(default=1.0, metadata={"help": "r_eff: trajectory-length reward up to optimal_steps"})
    optimal_steps: int = field(default=5, metadata={"help": "T_opt: steps with no length penalty"})
    length_decay: float = field(default=0.2, metadata={"help": "gamma: length reward lost per step beyond T_opt"})
    length_floor: float | None = field(
        default=None, metadata={"help": "lowest length reward; None lets it go negative (the paper's penalty)"}
    )
    format_weight: float = field(default=1.0, metadata={"help": "weight of the format reward in the total"})
    answer_weight: float = field(default=1.0, metadata={"help": "weight of the final-answer reward in the total"})
    click_weight: float = field(default=1.0, metadata={"help": "weight of the click-placement reward in the total"})
    progress_weight: float = field(default=1.0, metadata={"help": "weight of the progressive-improvement reward"})
    length_weight: float = field(default=1.0, metadata={"help": "weight of the trajectory-length reward"})
    total_divisor: float = field(
        default=5.0, metadata={"help": "the weighted sum is divided by this (authors: 5, the mean of the components)"}
    )
    dialect: str = field(default="ibis", metadata={"help": "action grammar: ibis (paper) or released"})
    strict_layout: bool = field(
        default=False,
        metadata={
            "help": "format also demands the authors' newlines: <think>\\n…\\n</think>\\n<action>\\n…\\n</action>"
        },
    )

    def __post_init__(self):
        if len(self.iou_thresholds) != len(self.iou_rewards):
            raise ValueError(
                f"iou_thresholds {self.iou_thresholds} and iou_rewards {self.iou_rewards} must have the same length"
            )
        if list(self.iou_thresholds) != sorted(self.iou_thresholds, reverse=True):
            raise ValueError(f"iou_thresholds must be in descending order, got {self.iou_thresholds}")
        if self.optimal_steps < 0:
            raise ValueError(f"optimal_steps must be >= 0, got {self.optimal_steps}")
        if self.total_divisor <= 0:
            raise ValueError(f"total_divisor must be positive, got {self.total_divisor}")
        Grammar(self.dialect)  # raises on an unknown dialect

    @property
    def weights(self) -> dict[str, float]:
        """{component: weight} in COMPONENTS order."""
        return {name: getattr(self, f"{name}_weight") for name in COMPONENTS}

    @classmethod
    def from_dict(cls, d: Mapping) -> RewardConfig:
        """Build from a plain mapping (a yaml section); unknown keys are an error naming the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown reward option(s) {unknown}; valid: {sorted(names)}")
        d = dict(d)
        for key in ("iou_thresholds", "iou_rewards"):
            if key in d:
                d[key] = [float(v) for v in d[key]]
        return cls(**d)


DEFAULT_CONFIG = RewardConfig()

# ----------------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------------

_PARSE_SIZE = (1000, 1000)  # format checks need some image size to map coordinates; validity does not depend on it
_TAGS = ("think", "action", "answer")
_LAYOUT = re.compile(r"\s*<think>(.*?)</think>\s*<action>(.*?)</action>(?:\s*<answer>(.*?)</answer>)?\s*", re.DOTALL)
_STRICT_LAYOUT = re.compile(
    r"<think>\n(.*?)\n</think>\n<action>\n(.*?)\n</action>(?:\n<answer>\n(.*?)\n</answer>)?\s*", re.DOTALL
)


def format_score(text: str, dialect: str = "ibis", strict_layout: bool = False) -> float:
    """1.0 when `text` is a well-formed turn, else 0.0.

    Well-formed: the whole text is `<think>…</think>` then `<action>…</action>`, and `<answer>…</answer>` after them
    exactly when the action is Terminate; each tag once, in this order, nothing outside them but whitespace; the
    action body parses with `Grammar(dialect)`. `strict_layout` also demands the authors' line breaks
    (`<think>\\n…\\n</think>\\n<action>\\n…\\n</action>`). An empty <think> is accepted (the authors' regex does).

    Example: format_score("<think>\\nhere\\n</think>\\n<action>\\nPositive Point (0.5, 0.5)\\n</action>",
    "released") == 1.0; without the <think> section it is 0.0.
    """
    if not isinstance(text, str):
        return 0.0
    for tag in _TAGS:
        if text.count(f"<{tag}>") > 1 or text.count(f"</{tag}>") > 1:
            return 0.0
    m = (_STRICT_LAYOUT if strict_layout else _LAYOUT).fullmatch(text)
    if m is None:
        return 0.0
    try:
        action = Grammar(dialect).parse_action(m.group(2), _PARSE_SIZE)
    except ActionParseError:
        return 0.0
    has_answer = m.group(3) is not None
    return 1.0 if has_answer == action.terminate else 0.0


_MC_LETTER = re.compile(r"^\(?([a-z])\)?(?:[.):]\s*|\s+|$)(.*)$", re.DOTALL)
_YES_NO = re.compile(r"^(yes|no)\b")


def _normalise(text: str) -> str:
    text = " ".join(str(text).lower().split())
    return text.strip(" \t'\"`").rstrip(".!?,;:").strip()


def _choice(text: str) -> tuple[str | None, str]:
    """(letter, rest) of a multiple-choice answer such as "b", "(b)", "b. text", "b) text"; (None, text) otherwise."""
    m = _MC_LETTER.match(text)
    if m is None:
        return None, text
    letter, rest = m.group(1), m.group(2).strip()
    # "a cyst" is a sentence, not choice (a): a bare letter, or a letter with a choice separator, is a choice
    if rest and not re.match(r"^\(?[a-z][.):]", text):
        return None, text
    return letter, rest


def answer_match(prediction: str | None, truth: str) -> bool:
    """Exact match of a close-ended answer after normalisation.

    Normalisation: lower case, whitespace collapsed, surrounding quotes and trailing punctuation (. ! ? , ; :) removed.
    Then: yes/no questions compare the first word ("Yes, it is." matches "yes"); multiple-choice answers compare the
    option letter ("B", "(b)", "B. Pneumonia" all match "B" or "b) pneumonia"), and a lettered prediction also matches
    the option's text ("C. Pneumonia" matches "pneumonia"); anything else must match in full.

    Example: answer_match("B. Left lung", "b") is True; answer_match("maybe", "yes") is False.
    """
    if prediction is None:
        return False
    pred, gold = _normalise(prediction), _normalise(truth)
    if not gold:
        raise ValueError("the ground-truth answer is empty; give the VQA row's answer text in its `solution` column")
    if pred == gold:
        return True
    if gold in ("yes", "no"):
        m = _YES_NO.match(pred)
        return m is not None and m.group(1) == gold
    (p_letter, p_rest), (g_letter, g_rest) = _choice(pred), _choice(gold)
    if g_letter is not None and p_letter is not None:
        return p_letter == g_letter
    if g_letter is None and p_letter is not None:
        return _normalise(p_rest) == gold
    if g_letter is not None and p_letter is None:
        return bool(g_rest) and pred == _normalise(g_rest)
    return False


def iou_tier(value: float, config: RewardConfig = DEFAULT_CONFIG) -> float:
    """Piecewise segmentation reward (paper eq. 9): the reward of the first tier whose threshold IoU exceeds.

    Defaults: IoU > 0.8 -> 3, > 0.7 -> 2, > 0.5 -> 1, else 0 (strict inequalities: IoU 0.8 gives 2).
    Example: iou_tier(0.75) == 2.0; iou_tier(0.5) == 0.0.
    """
    for threshold, reward in zip(config.iou_thresholds, config.iou_rewards):
        if value > threshold:
            return float(reward)
    return float(config.iou_floor_reward)


def click_hits(
    clicks: Sequence[Click],
    prev_masks: Mapping[str, np.ndarray] | np.ndarray,
    gts: Mapping[str, np.ndarray] | np.ndarray,
) -> list[bool]:
    """Per click: does it lie in the error region it can correct (paper eq. 10)?

    prev_masks, gts: HxW bool arrays (every click refers to them, whatever its target) or {target: HxW bool}. The
    mask before the step is M_{t-1}; FN = G & ~M_{t-1}, FP = M_{t-1} & ~G. A positive click hits when its pixel
    `click.pixel(H, W)` is in FN, a negative one when it is in FP. A target missing from `gts` has an empty ground
    truth (a click for an unknown target, or any click on a VQA row, can only miss its FN region); a target missing
    from `prev_masks` has an empty previous mask.
    """
    out = []
    for c in clicks:
        gt = _pick(gts, c.target)
        prev = _pick(prev_masks, c.target)
        shape = gt.shape if gt is not None else prev.shape if prev is not None else None
        if shape is None:
            out.append(False)  # no mask at all for this click's target: nothing it could correct
            continue
        gt = np.zeros(shape, bool) if gt is None else gt
        prev = np.zeros(shape, bool) if prev is None else prev
        if gt.shape != prev.shape:
            raise ValueError(f"previous mask {prev.shape} and ground truth {gt.shape} of {c.target!r} differ in shape")
        r, col = c.pixel(*shape)
        out.append(bool(gt[r, col] and not prev[r, col]) if c.positive else bool(prev[r, col] and not gt[r, col]))
    return out


def click_placement(
    clicks: Sequence[Click],
    prev_masks: Mapping[str, np.ndarray] | np.ndarray,
    gts: Mapping[str, np.ndarray] | np.ndarray,
    config: RewardConfig = DEFAULT_CONFIG,
) -> float | None:
    """Region-based click placement reward of one step (paper eq. 11), averaged over the step's clicks.

    r = mean over clicks of (bonus if the click hits its error region else penalty); defaults +1 / -1; None when the
    step has no clicks. See `click_hits` for the regions. Example: with an empty previous mask, a positive click on
    the ground truth and another on the background give (1 + -1) / 2 = 0.0.
    """
    if not clicks:
        return None
    hits = click_hits(clicks, prev_masks, gts)
    return float(np.mean([config.click_bonus if h else config.click_penalty for h in hits]))


def progress(ious: Sequence[float], config: RewardConfig = DEFAULT_CONFIG) -> float | None:
    """Progressive improvement reward (paper eqs. 12-13), averaged over steps.

    ious: [IoU before the first step, IoU after step 1, ..., IoU after step N]. Step t earns `progress_reward` (1)
    when IoU_t > IoU_{t-1} strictly, else 0; the result is the mean over the N steps, None when N = 0.
    Example: progress([0.0, 0.6, 0.6, 0.8]) == 2/3.
    """
    if len(ious) < 2:
        return None
    gains = [config.progress_reward if b > a else 0.0 for a, b in zip(ious[:-1], ious[1:])]
    return float(np.mean(gains))


def length_score(num_steps: int, config: RewardConfig = DEFAULT_CONFIG) -> float:
    """Trajectory length reward (paper eq. 14).

    r = r_eff if T <= T_opt else r_eff - gamma * (T - T_opt), raised to `length_floor` when one is set. Defaults:
    r_eff = 1, T_opt = 5, gamma = 0.2, no floor, so it turns negative beyond 10 steps (the paper's "penalties
    increasing with trajectory length"). Example: length_score(5) == 1.0; length_score(7) == 0.6; length_score(12)
    == -0.4.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    r = config.length_bonus - config.length_decay * max(0, num_steps - config.optimal_steps)
    if config.length_floor is not None:
        r = max(r, config.length_floor)
    return float(r)


def total_reward(components: Mapping[str, float | None], config: RewardConfig = DEFAULT_CONFIG) -> float:
    """sum_i w_i * r_i / total_divisor over COMPONENTS; a None (not applicable) component counts as 0.

    Defaults (all weights 1, divisor 5) give the authors' mean of the five components. Example: format 1, answer 3,
    click 1, progress 1, length 1 -> 7 / 5 = 1.4.
    """
    weights = config.weights
    s = sum(weights[k] * float(components[k]) for k in COMPONENTS if components.get(k) is not None)
    return float(s / config.total_divisor)


# ----------------------------------------------------------------------------------------------------------------
# Row level: a whole trajectory, or one step-level completion
# ----------------------------------------------------------------------------------------------------------------


def _to_mask(value) -> np.ndarray | None:
    """HxW bool from an array, nested lists or a trajectory RLE dict; None stays None."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        if "counts" in value and "size" in value:
            return decode_mask(value)
        raise ValueError(f"expected an HxW mask or an RLE dict with 'size' and 'counts', got keys {sorted(value)}")
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"expected an HxW mask, got an array of shape {arr.shape}")
    return arr.astype(bool)


def _pick(masks, target: str) -> np.ndarray | None:
    if masks is None:
        return None
    if isinstance(masks, Mapping) and not ("counts" in masks and "size" in masks):
        return _to_mask(masks.get(target))
    return _to_mask(masks)


def _mask_dict(masks, targets: Sequence[str]) -> dict[str, np.ndarray]:
    """{target: HxW bool} from a dict, or from a single mask that belongs to the first target."""
    if masks is None:
        return {}
    if isinstance(masks, Mapping) and not ("counts" in masks and "size" in masks):
        return {str(t): _to_mask(m) for t, m in masks.items() if m is not None}
    if not targets:
        raise ValueError("a single ground-truth mask needs a target name; give {target: mask} or the row's target")
    return {targets[0]: _to_mask(masks)}


def _mean_iou(masks: Mapping[str, np.ndarray], gts: Mapping[str, np.ndarray]) -> float:
    return float(np.mean([iou(masks.get(t, np.zeros(g.shape, bool)), g) for t, g in gts.items()]))


def _acting(step: Step) -> bool:
    """Steps judged by the progress reward: clicks, undo, and unusable outputs (which change nothing)."""
    return step.error is not None or (step.action is not None and not step.action.terminate)


def trajectory_rewards(
    trajectory: Trajectory,
    gt_masks: Mapping[str, np.ndarray] | np.ndarray | None = None,
    solution: str | None = None,
    config: RewardConfig = DEFAULT_CONFIG,
) -> dict[str, float | None]:
    """All reward components of one multi-turn trajectory, plus "total" and "iou" (final mean IoU, None for VQA).

    gt_masks: {target: HxW bool} (a single HxW mask belongs to the first target); None for a VQA row.
    solution: the ground-truth answer of a close-ended VQA row; None for a segmentation row.

    - format:   mean `format_score` over the model turns (dialect of the config).
    - answer:   segmentation rows: `iou_tier` of the final masks' mean IoU over the gt targets (a target never
                segmented counts as empty); VQA rows: `match_reward` when `answer_match(trajectory.answer, solution)`;
                a row with both gets the sum; None with neither.
    - click:    mean over the steps with clicks of `click_placement`, judged against the masks before that step
                (the initial masks, carried over steps that changed nothing); averaging per step first keeps a step
                with many clicks from outweighing the others. None without clicks. A VQA row's clicks meet an empty
                ground truth, so each is a penalty: clicking where no mask is asked for costs reward.
    - progress: `progress` over the steps that act (clicks, undo, unusable outputs; Terminate and answers do not
                change the mask and are left out), IoU = mean over gt targets. None for VQA rows and trajectories
                with no acting step.
    - length:   `length_score(len(trajectory.steps))`: every model turn counts, the final Terminate included.
    """
    h, w = trajectory.image_size
    targets = list(trajectory.targets) or [DEFAULT_TARGET]
    gts = _mask_dict(gt_masks, targets)
    for t, g in gts.items():
        if g.shape != (h, w):
            raise ValueError(f"ground truth of {t!r} has shape {g.shape}, but the trajectory's image is {(h, w)}")
    steps = trajectory.steps
    out: dict[str, float | None] = {}
    out["format"] = (
        float(np.mean([format_score(s.text, config.dialect, config.strict_layout) for s in steps])) if steps else 0.0
    )

    answer = None
    final_iou = _mean_iou(trajectory.final_masks, gts) if gts else None
    if gts:
        answer = iou_tier(final_iou, config)
    if solution is not None:
        answer = (answer or 0.0) + (config.match_reward if answer_match(trajectory.answer, solution) else 0.0)
    out["answer"] = answer

    masks = {t: np.asarray(m, bool) for t, m in trajectory.initial_masks.items()}
    ious = [_mean_iou(masks, gts)] if gts else []
    click_scores = []
    for step in steps:
        if step.action is not None and step.action.clicks:
            click_scores.append(click_placement(step.action.clicks, masks, gts, config))
        after = {**masks, **step.masks} if step.masks else masks
        if gts and _acting(step):
            ious.append(_mean_iou(after, gts))
        masks = after
    out["click"] = float(np.mean(click_scores)) if click_scores else None
    out["progress"] = progress(ious, config) if gts else None
    out["length"] = length_score(len(steps), config)
    out["total"] = total_reward(out, config)
    out["iou"] = final_iou
    return out


def _parse(text: str, dialect: str, size: tuple[int, int], target: str) -> ParsedOutput | None:
    """The parsed turn, None when unusable; an answer-only turn reads as Terminate (it ends the episode)."""
    try:
        parsed = Grammar(dialect).parse(text, size, target)
    except ActionParseError:
        return None
    if parsed.action is None:
        parsed = replace(parsed, action=Action(terminate=True))
    return parsed


def step_rewards(
    completion: str,
    gt_mask: np.ndarray | None = None,
    prev_mask: np.ndarray | None = None,
    pred_mask: np.ndarray | None = None,
    solution: str | None = None,
    step_index: int = 0,
    target: str = DEFAULT_TARGET,
    image_size: tuple[int, int] | None = None,
    config: RewardConfig = DEFAULT_CONFIG,
) -> dict[str, float | None]:
    """All reward components of one completion of a step-level row (the authors' recipe), plus "total" and "iou".

    gt_mask:    HxW bool ground truth of the row's target; None for a VQA row.
    prev_mask:  HxW bool mask before this step (the previous clicks' result); None = empty.
    pred_mask:  HxW bool mask after the completion's clicks, computed by the caller's tool from the previous clicks
                plus these; required when the completion clicks on a segmentation row; a Terminate keeps prev_mask.
    solution:   ground-truth answer of a close-ended VQA row.
    step_index: 0-based index of this step in its trajectory, so the step makes the trajectory step_index + 1 long.
    target:     the row's target name; clicks of the released dialect carry it, ibis clicks name their own (all
                clicks are judged against gt_mask here).
    image_size: (H, W) to map coordinates; defaults to the masks' shape (needed only for a VQA row that clicks).

    Components: format = `format_score`; answer = `iou_tier(IoU(mask after the step, gt))` and/or the VQA match,
    0 for an unusable completion (it produced no mask and no answer); click = `click_placement` against prev_mask
    (None without clicks); progress = `progress_reward` if IoU(pred) > IoU(prev) for a click or undo step, 0 for an
    unusable completion, None for a Terminate or on a VQA row; length = `length_score(step_index + 1)`.
    """
    gt = _to_mask(gt_mask)
    prev = _to_mask(prev_mask)
    pred = _to_mask(pred_mask)
    shape = next((m.shape for m in (gt, prev, pred) if m is not None), None)
    size = tuple(image_size) if image_size is not None else shape or _PARSE_SIZE
    if shape is not None and prev is None:
        prev = np.zeros(shape, bool)
    parsed = _parse(completion, config.dialect, size, target)
    action = None if parsed is None else parsed.action
    out: dict[str, float | None] = {"format": format_score(completion, config.dialect, config.strict_layout)}

    after = None
    if action is not None and gt is not None:
        if action.clicks:
            if pred is None:
                raise ValueError(
                    "the completion clicks but no pred_mask was given: run the tool on the previous clicks plus this "
                    "completion's and pass the resulting mask as the row's pred_mask"
                )
            after = pred
        else:
            after = prev if (action.terminate or pred is None) else pred
    answer = None
    if gt is not None:
        answer = 0.0 if after is None else iou_tier(iou(after, gt), config)
    if solution is not None:
        matched = parsed is not None and answer_match(parsed.answer, solution)
        answer = (answer or 0.0) + (config.match_reward if matched else 0.0)
    out["answer"] = answer

    if action is not None and action.clicks:
        if gt is not None:
            out["click"] = click_placement(action.clicks, prev, gt, config)
        else:  # a VQA row: nothing to correct, each click is a penalty
            out["click"] = float(config.click_penalty)
    else:
        out["click"] = None
    if gt is None or (action is not None and action.terminate):
        out["progress"] = None
    elif action is None:
        out["progress"] = 0.0
    else:
        out["progress"] = progress([iou(prev, gt), iou(after, gt)], config)
    out["length"] = length_score(step_index + 1, config)
    out["total"] = total_reward(out, config)
    out["iou"] = None if gt is None else iou(prev if after is None else after, gt)
    return out


# ----------------------------------------------------------------------------------------------------------------
# trl reward functions
# ----------------------------------------------------------------------------------------------------------------


def completion_text(completion) -> str:
    """The model-written text of one trl completion: a plain string, or a conversational completion (a list of
    messages) whose assistant turns are joined by newlines; content may be a string or a list of
    {"type": "text", "text": ...} parts."""
    return "\n".join(assistant_turns(completion))


def assistant_turns(completion) -> list[str]:
    """Each assistant turn's text of one trl completion (one element for a plain string)."""
    if isinstance(completion, str):
        return [completion]
    if isinstance(completion, Mapping):
        completion = [completion]
    if not isinstance(completion, Sequence):
        raise TypeError(f"a completion is a string or a list of messages, got {type(completion).__name__}")
    turns = []
    for message in completion:
        if not isinstance(message, Mapping) or "content" not in message:
            raise TypeError(f"a conversational completion holds {{'role', 'content'}} messages, got {message!r:.80}")
        if message.get("role", "assistant") != "assistant":
            continue
        content = message["content"]
        if isinstance(content, str):
            turns.append(content)
        else:
            turns.append(
                "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
            )
    return turns


def _column(kwargs: dict, name: str, n: int, default=None) -> list:
    """One value per completion: trl passes dataset columns as lists of length n; anything else (a scalar, one
    array, one (H, W) pair) is the same for every row."""
    value = kwargs.get(name)
    per_row = isinstance(value, (list, tuple)) and len(value) == n
    if name == "image_size" and per_row and value and all(isinstance(v, (int, np.integer)) for v in value):
        per_row = False  # a single (H, W) pair with n == 2
    if not per_row:
        if isinstance(value, (list, tuple)) and name not in ("image_size",):
            raise ValueError(f"column {name!r} has {len(value)} values for {n} completions; give one per completion")
        return [default if value is None else value] * n
    return [default if v is None else v for v in value]


def _rows(completions: list, kwargs: dict, config: RewardConfig) -> list[dict[str, float | None]]:
    """All components per completion: from its `trajectory` when there is one, else as a step-level row."""
    n = len(completions)
    cols = {
        k: _column(kwargs, k, n)
        for k in ("trajectory", "gt_mask", "gt_masks", "prev_mask", "pred_mask", "solution", "target", "image_size")
    }
    steps = _column(kwargs, "step_index", n, 0)
    out = []
    for i, completion in enumerate(completions):
        traj = cols["trajectory"][i]
        gt = cols["gt_masks"][i] if cols["gt_masks"][i] is not None else cols["gt_mask"][i]
        if traj is not None:
            if isinstance(traj, Mapping):
                traj = Trajectory.from_dict(traj)
            out.append(trajectory_rewards(traj, gt, cols["solution"][i], config))
            continue
        turns = assistant_turns(completion)
        out.append(
            step_rewards(
                turns[-1] if turns else "",
                gt_mask=gt,
                prev_mask=cols["prev_mask"][i],
                pred_mask=cols["pred_mask"][i],
                solution=cols["solution"][i],
                step_index=int(steps[i]),
                target=cols["target"][i] or DEFAULT_TARGET,
                image_size=cols["image_size"][i],
                config=config,
            )
        )
    return out


def format_reward(completions: list, config: RewardConfig = DEFAULT_CONFIG, **kwargs) -> list[float]:
    """trl reward: mean `format_score` over each completion's assistant turns (1.0 well-formed, 0.0 not).

    Example: format_reward(["<think>\\nx\\n</think>\\n<action>\\nring: positive (0.5, 0.5)\\n</action>", "click"])
    == [1.0, 0.0]. A `trajectory` column, when given, scores the trajectory's turns instead.
    """
    n = len(completions)
    trajs = _column(kwargs, "trajectory", n)
    out = []
    for completion, traj in zip(completions, trajs):
        if traj is not None:
            traj = Trajectory.from_dict(traj) if isinstance(traj, Mapping) else traj
            texts = [s.text for s in traj.steps]
        else:
            texts = assistant_turns(completion)
        out.append(
            float(np.mean([format_score(t, config.dialect, config.strict_layout) for t in texts])) if texts else 0.0
        )
    return out


def answer_reward(completions: list, config: RewardConfig = DEFAULT_CONFIG, **kwargs) -> list[float | None]:
    """trl reward: final-answer reward per row; IoU tiers (3/2/1/0 above 0.8/0.7/0.5) on segmentation rows
    (`gt_mask` + `pred_mask`, or a `trajectory`), exact match (1/0) on VQA rows (`solution`); None with neither.

    Example: answer_reward(["<think>\\n\\n</think>\\n<action>\\nTerminate\\n</action>\\n<answer>\\nB. cyst\\n</answer>"],
    solution=["b"]) == [1.0]; on a segmentation row the same call with gt_mask=[G], prev_mask=[M] gives
    iou_tier(IoU(M, G)).
    """
    return [r["answer"] for r in _rows(completions, kwargs, config)]


def click_reward(completions: list, config: RewardConfig = DEFAULT_CONFIG, **kwargs) -> list[float | None]:
    """trl reward: region-based click placement, mean over clicks of +1 (positive click in G & ~M_prev, negative
    click in M_prev & ~G) or -1 (anywhere else); None for completions without clicks.

    Example: gt_mask G with G[5, 5] True, empty prev_mask, completion clicking "positive (x, y)" at pixel (5, 5)
    -> [1.0]; the same click at a background pixel -> [-1.0].
    """
    return [r["click"] for r in _rows(completions, kwargs, config)]


def progress_reward(completions: list, config: RewardConfig = DEFAULT_CONFIG, **kwargs) -> list[float | None]:
    """trl reward: 1 when the step's IoU strictly beats the previous step's (averaged over a trajectory's acting
    steps), else 0; None on VQA rows and Terminate steps.

    Example: prev_mask with IoU 0.4, pred_mask with IoU 0.6 -> [1.0]; pred_mask equal to prev_mask -> [0.0].
    """
    return [r["progress"] for r in _rows(completions, kwargs, config)]


def length_reward(completions: list, config: RewardConfig = DEFAULT_CONFIG, **kwargs) -> list[float]:
    """trl reward: r_eff = 1 up to T_opt = 5 steps, minus gamma = 0.2 per step beyond (negative past 10 steps);
    T = the trajectory's number of turns, or `step_index` + 1 on step-level rows.

    Example: length_reward(["..."], step_index=[6]) == [0.6].
    """
    return [r["length"] for r in _rows(completions, kwargs, config)]


TRL_REWARDS: dict[str, Callable] = {
    "format": format_reward,
    "answer": answer_reward,
    "click": click_reward,
    "progress": progress_reward,
    "length": length_reward,
}


def reward_functions(config: RewardConfig = DEFAULT_CONFIG) -> list[Callable]:
    """The five trl reward functions with `config` bound, in COMPONENTS order, named `<component>_reward` (trl logs
    them under these names). Pass `reward_weights(config)` as `GRPOConfig.reward_weights` to get `total_reward`."""
    funcs = []
    for func in TRL_REWARDS.values():

        def bound(completions, _func=func, **kwargs):
            kwargs.pop("config", None)
            return _func(completions, config=config, **kwargs)

        bound.__name__ = bound.__qualname__ = func.__name__
        bound.__doc__ = func.__doc__
        funcs.append(bound)
    return funcs


def reward_weights(config: RewardConfig = DEFAULT_CONFIG) -> list[float]:
    """w_i / total_divisor in COMPONENTS order, so that trl's weighted sum equals `total_reward` (None -> 0)."""
    return [config.weights[name] / config.total_divisor for name in COMPONENTS]
