"""Reading the IBISAgent trajectory JSON (schema version 1) without the `ibisagent` package: RLE masks, clicks, texts.

The schema is owned by `ibisagent/trajectory.py` in the server's project; this reader follows it field by field:
{"version": "1", "instruction", "image_size": [H, W], "dialect", "targets", "initial_masks": {target: RLE},
"answer", "stop_reason", "steps": [{"index", "text", "think", "action", "answer", "error", "clicks": {target:
[{"x", "y", "positive", "target"}]}, "masks": {target: RLE}, "scores", "metrics", "timings"}], "meta"}.
RLE is {"size": [H, W], "counts": [int]}: run lengths over the row-major flattened HxW mask, starting with a
(possibly zero-length) run of background. Click (x, y) are pixels of the slice (x = column, y = row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

SUPPORTED_VERSIONS = ("1",)


class TrajectoryFormatError(ValueError):
    """The trajectory JSON does not follow the schema; the message names the field."""


class UnsupportedTrajectoryVersion(TrajectoryFormatError):
    """The trajectory was written in a schema version this module cannot read."""


def decode_rle(rle: dict) -> np.ndarray:
    """RLE dict -> HxW bool mask (see the module docstring)."""
    try:
        h, w = (int(s) for s in rle["size"])
        counts = np.asarray(rle["counts"], np.int64).reshape(-1)
    except (KeyError, TypeError, ValueError) as exc:
        raise TrajectoryFormatError(f"an RLE mask needs 'size': [H, W] and 'counts': [int, ...] ({exc})") from exc
    if (counts < 0).any():
        raise TrajectoryFormatError("RLE counts must be non-negative run lengths")
    if int(counts.sum()) != h * w:
        raise TrajectoryFormatError(f"RLE counts sum to {int(counts.sum())}, expected {h * w} for size {h}x{w}")
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
    except (KeyError, TypeError, ValueError) as exc:
        raise TrajectoryFormatError(f"{where}: a click needs x, y, positive ({exc})") from exc


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
        if not isinstance(d, dict):
            raise TrajectoryFormatError(f"a trajectory is a JSON object, got {type(d).__name__}")
        version = str(d.get("version"))
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedTrajectoryVersion(
                f"trajectory version {version!r} is not supported by this Slicer module (it reads version(s) "
                f"{', '.join(SUPPORTED_VERSIONS)}); update the IBISAgent Slicer module to match the server"
            )
        try:
            h, w = (int(s) for s in d["image_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TrajectoryFormatError(f"'image_size' must be [H, W] ({exc})") from exc
        steps = []
        for n, s in enumerate(d.get("steps") or []):
            where = f"steps[{n}]"
            masks = dict(s.get("masks") or {})
            for t, rle in masks.items():
                if [int(v) for v in rle.get("size", [])] != [h, w]:
                    raise TrajectoryFormatError(f"{where}.masks[{t!r}] has size {rle.get('size')}, expected {[h, w]}")
            steps.append(
                TrajectoryStep(
                    index=int(s.get("index", n)),
                    text=s.get("text") or "",
                    think=s.get("think") or "",
                    action=s.get("action"),
                    answer=s.get("answer"),
                    error=s.get("error"),
                    clicks={
                        t: [_click(c, f"{where}.clicks[{t!r}]") for c in cs]
                        for t, cs in (s.get("clicks") or {}).items()
                    },
                    masks_rle=masks,
                    scores=dict(s.get("scores") or {}),
                    metrics=dict(s.get("metrics") or {}),
                )
            )
        return cls(
            version=version,
            instruction=d.get("instruction") or "",
            image_size=(h, w),
            targets=list(d.get("targets") or []),
            steps=steps,
            initial_masks_rle=dict(d.get("initial_masks") or {}),
            dialect=d.get("dialect", "ibis"),
            answer=d.get("answer"),
            stop_reason=d.get("stop_reason"),
            meta=dict(d.get("meta") or {}),
        )

    @classmethod
    def from_json(cls, text: str) -> TrajectoryView:
        return cls.from_dict(json.loads(text))

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
