"""Reading the IBISAgent trajectory JSON (schema version 1) without the `ibisagent` package: RLE masks, clicks, texts.

The schema is owned by `ibisagent/trajectory.py` in the server's project; this reader follows it field by field:
{"version": "1", "instruction", "image_size": [H, W], "dialect", "targets", "initial_masks": {target: RLE},
"answer", "stop_reason", "steps": [{"index", "text", "think", "action", "answer", "error", "clicks": {target:
[{"x", "y", "positive", "target"}]}, "masks": {target: RLE}, "scores", "metrics", "timings"}], "meta"}.
RLE is {"size": [H, W], "counts": [int]}: run lengths over the row-major flattened HxW mask, starting with a
(possibly zero-length) run of background. Click (x, y) are pixels of the slice (x = column, y = row).

Trajectories come from a server over the network, so every RLE is checked before any mask is allocated, as the core
does (`ibisagent.trajectory.check_rle`, mirrored here because this library cannot import `ibisagent`): size two
positive ints with H*W at most `MAX_MASK_PIXELS` (2**26, 64 Mi pixels), counts non-negative ints summing to H*W
(Python ints: no sum wraps). Every malformed input, whatever Python raises for it, becomes `TrajectoryFormatError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

SUPPORTED_VERSIONS = ("1",)
MAX_MASK_PIXELS = 2**26
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RecursionError, MemoryError)


class TrajectoryFormatError(ValueError):
    """The trajectory JSON does not follow the schema; the message names the field."""


class UnsupportedTrajectoryVersion(TrajectoryFormatError):
    """The trajectory was written in a schema version this module cannot read."""


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_size(size, max_pixels: int, what: str) -> tuple[int, int]:
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
        raise TrajectoryFormatError(f"{what} must be [H, W], two positive integers, got {str(size)[:80]}")
    h, w = int(size[0]), int(size[1])
    if h * w > max_pixels:
        raise TrajectoryFormatError(
            f"{what} {h}x{w} is {h * w} pixels, above the limit of max_pixels={max_pixels} "
            "(IBISAgentLib.trajectory.MAX_MASK_PIXELS)"
        )
    return h, w


def check_rle(rle, max_pixels: int = MAX_MASK_PIXELS) -> tuple[int, int, list[int]]:
    """(H, W, counts) of a valid RLE dict, checked without allocating the mask; else TrajectoryFormatError."""
    if not isinstance(rle, dict):
        raise TrajectoryFormatError(
            f"an RLE mask is an object {{'size': [H, W], 'counts': [...]}}, got {type(rle).__name__}"
        )
    if "size" not in rle or "counts" not in rle:
        raise TrajectoryFormatError("an RLE mask needs 'size': [H, W] and 'counts': [int, ...]")
    h, w = _check_size(rle["size"], max_pixels, "RLE size")
    counts = rle["counts"]
    if not isinstance(counts, (list, tuple, np.ndarray)):
        raise TrajectoryFormatError(f"RLE counts must be a list of run lengths, got {type(counts).__name__}")
    counts = counts.tolist() if isinstance(counts, np.ndarray) else list(counts)
    if not all(_is_int(c) for c in counts):
        raise TrajectoryFormatError("RLE counts must be integers (run lengths)")
    counts = [int(c) for c in counts]
    if counts and min(counts) < 0:
        raise TrajectoryFormatError("RLE counts must be non-negative run lengths")
    total = sum(counts)
    if total != h * w:
        raise TrajectoryFormatError(f"RLE counts sum to {str(total)[:40]}, expected {h * w} for size {h}x{w}")
    return h, w, counts


def decode_rle(rle: dict, max_pixels: int = MAX_MASK_PIXELS) -> np.ndarray:
    """RLE dict -> HxW bool mask (see the module docstring), checked first: a malformed RLE raises
    TrajectoryFormatError."""
    h, w, counts = check_rle(rle, max_pixels)
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(h, w)


def encode_rle(mask) -> dict:
    """HxW bool mask -> RLE dict (the inverse of `decode_rle`)."""
    m = np.asarray(mask, bool)
    flat = m.ravel()
    if flat.size == 0:
        return {"size": [int(s) for s in m.shape], "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [int(s) for s in m.shape], "counts": counts}


def _check_masks(masks: dict, size: tuple[int, int], where: str) -> None:
    """Each {target: RLE} of `where` is a valid RLE of `size` (checked, not decoded)."""
    for t, rle in masks.items():
        try:
            h, w, _ = check_rle(rle)
        except TrajectoryFormatError as exc:
            raise TrajectoryFormatError(f"{where}[{t!r}]: {exc}") from exc
        if (h, w) != size:
            raise TrajectoryFormatError(f"{where}[{t!r}] has size {[h, w]}, expected {list(size)}")


@dataclass(frozen=True)
class ClickPoint:
    """One click of the trajectory: (x, y) pixels of the slice (x = column, y = row), float, pixel centre at +0.5."""

    x: float
    y: float
    positive: bool
    target: str = "target"


@dataclass
class TrajectoryStep:
    """One model turn. `clicks` and `masks_rle` are the state after the step, per target (empty for an unparsable
    output, whose state is the previous step's)."""

    index: int
    text: str = ""
    think: str = ""
    action: dict | None = None
    answer: str | None = None
    error: str | None = None
    clicks: dict[str, list[ClickPoint]] = field(default_factory=dict)
    masks_rle: dict[str, dict] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def mask(self, target: str | None = None) -> np.ndarray | None:
        """HxW bool: this step's mask of `target`, or the union over targets when None; None if the step has none."""
        if not self.masks_rle:
            return None
        if target is not None:
            return decode_rle(self.masks_rle[target]) if target in self.masks_rle else None
        masks = [decode_rle(r) for r in self.masks_rle.values()]
        out = masks[0].copy()
        for m in masks[1:]:
            out |= m
        return out

    def all_clicks(self) -> list[ClickPoint]:
        return [c for cs in self.clicks.values() for c in cs]

    def describe(self) -> str:
        """Human-readable text of the step for the reasoning box: reasoning, action, answer or error."""
        parts = [f"Step {self.index}"]
        if self.think:
            parts.append(f"Reasoning: {self.think}")
        if self.action:
            if self.action.get("terminate"):
                parts.append("Action: terminate")
            elif self.action.get("undo"):
                parts.append("Action: undo the previous step")
            else:
                clicks = [
                    f"{c.get('target', 'target')}: {'positive' if c.get('positive') else 'negative'} "
                    f"({float(c.get('x', 0)):.1f}, {float(c.get('y', 0)):.1f})"
                    for c in self.action.get("clicks", [])
                ]
                parts.append("Action: " + "; ".join(clicks))
        if self.answer:
            parts.append(f"Answer: {self.answer}")
        if self.error:
            parts.append(f"Unusable output: {self.error}")
        if not self.think and self.text:
            parts.append(f"Model output: {self.text}")
        return "\n".join(parts)


def _click(d: dict, where: str) -> ClickPoint:
    try:
        return ClickPoint(float(d["x"]), float(d["y"]), bool(d["positive"]), str(d.get("target", "target")))
    except _MALFORMED as exc:
        raise TrajectoryFormatError(f"{where}: a click needs x, y, positive ({type(exc).__name__}: {exc})") from exc


@dataclass
class TrajectoryView:
    """A decoded trajectory for viewing. Masks stay RLE until asked for; all masks are HxW bool of `image_size`."""

    version: str
    instruction: str
    image_size: tuple[int, int]
    targets: list[str]
    steps: list[TrajectoryStep]
    initial_masks_rle: dict[str, dict] = field(default_factory=dict)
    dialect: str = "ibis"
    answer: str | None = None
    stop_reason: str | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> TrajectoryView:
        """The view of a schema dict. Every RLE is checked here (not decoded), so later mask reads cannot fail;
        anything malformed raises TrajectoryFormatError naming the field."""
        if not isinstance(d, dict):
            raise TrajectoryFormatError(f"a trajectory is a JSON object, got {type(d).__name__}")
        version = str(d.get("version"))
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedTrajectoryVersion(
                f"trajectory version {version[:40]!r} is not supported by this Slicer module (it reads version(s) "
                f"{', '.join(SUPPORTED_VERSIONS)}); update the IBISAgent Slicer module to match the server"
            )
        size = _check_size(d.get("image_size"), MAX_MASK_PIXELS, "'image_size'")
        where = "the trajectory"
        try:
            steps = []
            raw_steps = d.get("steps") or []
            if not isinstance(raw_steps, list):
                raise TrajectoryFormatError(f"'steps' must be a list, got {type(raw_steps).__name__}")
            for n, s in enumerate(raw_steps):
                where = f"steps[{n}]"
                masks = dict(s.get("masks") or {})
                _check_masks(masks, size, f"{where}.masks")
                steps.append(
                    TrajectoryStep(
                        index=int(s.get("index", n)),
                        text=str(s.get("text") or ""),
                        think=str(s.get("think") or ""),
                        action=s.get("action"),
                        answer=s.get("answer"),
                        error=s.get("error"),
                        clicks={
                            t: [_click(c, f"{where}.clicks[{t!r}]") for c in cs]
                            for t, cs in dict(s.get("clicks") or {}).items()
                        },
                        masks_rle=masks,
                        scores=dict(s.get("scores") or {}),
                        metrics=dict(s.get("metrics") or {}),
                    )
                )
            where = "initial_masks"
            initial = dict(d.get("initial_masks") or {})
            _check_masks(initial, size, where)
            where = "the trajectory"
            return cls(
                version=version,
                instruction=str(d.get("instruction") or ""),
                image_size=size,
                targets=list(d.get("targets") or []),
                steps=steps,
                initial_masks_rle=initial,
                dialect=d.get("dialect", "ibis"),
                answer=d.get("answer"),
                stop_reason=d.get("stop_reason"),
                meta=dict(d.get("meta") or {}),
            )
        except TrajectoryFormatError as exc:
            if str(exc).startswith(where):
                raise
            raise TrajectoryFormatError(f"{where}: {exc}") from exc
        except _MALFORMED as exc:
            raise TrajectoryFormatError(f"{where}: malformed ({type(exc).__name__}: {str(exc)[:200]})") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> TrajectoryView:
        """The view of a trajectory JSON text; unreadable JSON raises TrajectoryFormatError."""
        try:
            data = json.loads(text)
        except _MALFORMED as exc:  # JSONDecodeError, UnicodeDecodeError, RecursionError (deep nesting), ...
            raise TrajectoryFormatError(f"the trajectory JSON cannot be read ({type(exc).__name__}: {exc})") from exc
        return cls.from_dict(data)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def initial_mask(self) -> np.ndarray:
        """HxW bool union of the initial masks (all False when the episode started empty)."""
        out = np.zeros(self.image_size, bool)
        for rle in self.initial_masks_rle.values():
            out |= decode_rle(rle)
        return out

    def _check_position(self, position: int | None) -> bool:
        """False for "before any step" (None or negative); raises for a position past the last step."""
        if position is None or position < 0:
            return False
        if position >= len(self.steps):
            raise IndexError(f"step position {position} is out of range; the trajectory has {len(self.steps)} steps")
        return True

    def _state_step(self, position: int | None) -> TrajectoryStep | None:
        if not self._check_position(position):
            return None
        for step in reversed(self.steps[: position + 1]):
            if step.masks_rle:
                return step
        return None

    def mask_at(self, position: int | None) -> np.ndarray:
        """HxW bool union mask of the state after `self.steps[position]` (the latest step at or before it that
        recorded masks); the initial mask for None, -1, or when no such step exists."""
        step = self._state_step(position)
        return self.initial_mask() if step is None else step.mask()

    def clicks_at(self, position: int | None) -> list[ClickPoint]:
        """All clicks (every target) of the state after `self.steps[position]`; [] before any step."""
        if not self._check_position(position):
            return []
        for step in reversed(self.steps[: position + 1]):
            if step.clicks:
                return step.all_clicks()
        return []

    @property
    def final_mask(self) -> np.ndarray:
        """HxW bool union mask after the last step (the same rule as the core's `Trajectory.final_mask`)."""
        return self.mask_at(len(self.steps) - 1)
