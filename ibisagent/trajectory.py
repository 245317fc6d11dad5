"""The trajectory: the one serialisable record of an episode, shared by the CLI report, the MONAI Label response,
the Slicer viewer, SFT data and RL rewards.

JSON schema (version TRAJECTORY_VERSION), all coordinates in pixels of the original image (x = column, y = row):

    {"version": "1", "instruction": str, "image_size": [H, W], "dialect": "ibis"|"released",
     "targets": [str], "initial_masks": {target: RLE} , "answer": str|null, "stop_reason": str,
     "steps": [{"index": int, "text": str, "think": str, "action": {"clicks": [...], "terminate": bool, "undo": bool}|null,
                "answer": str|null, "error": str|null, "clicks": {target: [click, ...]}, "masks": {target: RLE},
                "scores": {target: float}, "metrics": {name: float}, "timings": {phase: seconds}}],
     "meta": {...}}

A click is {"x": float, "y": float, "positive": bool, "target": str}. RLE is {"size": [H, W], "counts": [int]}: run
lengths over the row-major flattened mask, starting with a (possibly zero-length) run of background.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ibisagent.types import Action, Click

TRAJECTORY_VERSION = "1"
STOP_REASONS = ("answer", "terminate", "max_steps", "repeated_action", "invalid_action", "policy_error")


def encode_mask(mask: np.ndarray) -> dict:
    """HxW bool -> RLE dict (see module docstring)."""
    flat = np.asarray(mask, bool).ravel()
    if flat.size == 0:
        return {"size": list(np.shape(mask)), "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [int(s) for s in np.shape(mask)], "counts": counts}


def decode_mask(rle: dict) -> np.ndarray:
    """RLE dict -> HxW bool."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h * w} for size {h}x{w}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(h, w)


@dataclass
class Step:
    """One model turn and its outcome. `clicks` and `masks` are the state *after* the action, per target."""

    index: int
    text: str
    think: str = ""
    action: Action | None = None
    answer: str | None = None
    error: str | None = None
    clicks: dict[str, list[Click]] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "text": self.text,
            "think": self.think,
            "action": None if self.action is None else self.action.to_dict(),
            "answer": self.answer,
            "error": self.error,
            "clicks": {t: [c.to_dict() for c in cs] for t, cs in self.clicks.items()},
            "masks": {t: encode_mask(m) for t, m in self.masks.items()},
            "scores": dict(self.scores),
            "metrics": dict(self.metrics),
            "timings": dict(self.timings),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Step:
        return cls(
            index=int(d["index"]),
            text=d.get("text", ""),
            think=d.get("think", ""),
            action=None if d.get("action") is None else Action.from_dict(d["action"]),
            answer=d.get("answer"),
            error=d.get("error"),
            clicks={t: [Click.from_dict(c) for c in cs] for t, cs in d.get("clicks", {}).items()},
            masks={t: decode_mask(m) for t, m in d.get("masks", {}).items()},
            scores=d.get("scores", {}),
            metrics=d.get("metrics", {}),
            timings=d.get("timings", {}),
        )


@dataclass
class Trajectory:
    """A whole episode. `final_masks` is the state after the last step (the initial masks if no step ran)."""

    instruction: str
    image_size: tuple[int, int]
    targets: list[str]
    dialect: str = "ibis"
    steps: list[Step] = field(default_factory=list)
    initial_masks: dict[str, np.ndarray] = field(default_factory=dict)
    answer: str | None = None
    stop_reason: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def final_masks(self) -> dict[str, np.ndarray]:
        for step in reversed(self.steps):
            if step.masks:
                return step.masks
        h, w = self.image_size
        return {t: self.initial_masks.get(t, np.zeros((h, w), bool)) for t in self.targets}

    @property
    def final_mask(self) -> np.ndarray:
        """Union of the final masks of all targets, HxW bool."""
        h, w = self.image_size
        out = np.zeros((h, w), bool)
        for m in self.final_masks.values():
            out |= m
        return out

    @property
    def num_clicks(self) -> int:
        last = next((s.clicks for s in reversed(self.steps) if s.clicks), {})
        return sum(len(cs) for cs in last.values())

    def to_dict(self) -> dict:
        return {
            "version": TRAJECTORY_VERSION,
            "instruction": self.instruction,
            "image_size": list(self.image_size),
            "dialect": self.dialect,
            "targets": list(self.targets),
            "initial_masks": {t: encode_mask(m) for t, m in self.initial_masks.items()},
            "answer": self.answer,
            "stop_reason": self.stop_reason,
            "steps": [s.to_dict() for s in self.steps],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Trajectory:
        version = str(d.get("version"))
        if version != TRAJECTORY_VERSION:
            raise ValueError(
                f"trajectory version {version!r} is not supported; this IBISAgent reads version {TRAJECTORY_VERSION}"
            )
        return cls(
            instruction=d["instruction"],
            image_size=tuple(d["image_size"]),
            targets=list(d["targets"]),
            dialect=d.get("dialect", "ibis"),
            steps=[Step.from_dict(s) for s in d.get("steps", [])],
            initial_masks={t: decode_mask(m) for t, m in d.get("initial_masks", {}).items()},
            answer=d.get("answer"),
            stop_reason=d.get("stop_reason"),
            meta=d.get("meta", {}),
        )

    def to_json(self, path: str | Path | None = None, indent: int | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Trajectory:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))
