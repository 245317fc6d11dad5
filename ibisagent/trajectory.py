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
lengths over the row-major flattened mask, starting with a (possibly zero-length) run of background. Readers check an
RLE before allocating anything: size two positive ints with H*W at most `MAX_MASK_PIXELS` (2**26, 64 Mi pixels),
counts non-negative ints summing to H*W (in Python ints, so no sum wraps). A malformed trajectory or RLE raises
`TrajectoryFormatError` (a ValueError) naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ibisagent.types import Action, Click

TRAJECTORY_VERSION = "1"
MAX_MASK_PIXELS = 2**26
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


class TrajectoryFormatError(ValueError):
    """A trajectory JSON or RLE mask does not follow the schema; the message names the field and the problem."""


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_size(size, max_pixels: int = MAX_MASK_PIXELS, what: str = "size") -> tuple[int, int]:
    """[H, W] as two positive ints with H*W <= max_pixels, else TrajectoryFormatError."""
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
        raise TrajectoryFormatError(f"{what} must be [H, W], two positive integers, got {str(size)[:80]}")
    h, w = int(size[0]), int(size[1])
    if h * w > max_pixels:
        raise TrajectoryFormatError(
            f"{what} {h}x{w} is {h * w} pixels, above the limit of max_pixels={max_pixels} "
            "(ibisagent.trajectory.MAX_MASK_PIXELS)"
        )
    return h, w


def check_rle(rle, max_pixels: int = MAX_MASK_PIXELS) -> tuple[int, int, list[int]]:
    """(H, W, counts) of a valid RLE dict, checked without allocating the mask; else TrajectoryFormatError.
    The Slicer library, which cannot import this package, mirrors it (`IBISAgentLib.trajectory.check_rle`)."""
    if not isinstance(rle, dict):
        raise TrajectoryFormatError(
            f"an RLE mask is an object {{'size': [H, W], 'counts': [...]}}, got {type(rle).__name__}"
        )
    if "size" not in rle or "counts" not in rle:
        raise TrajectoryFormatError("an RLE mask needs 'size': [H, W] and 'counts': [int, ...]")
    h, w = check_size(rle["size"], max_pixels, "RLE size")
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


def decode_mask(rle: dict, max_pixels: int = MAX_MASK_PIXELS) -> np.ndarray:
    """RLE dict -> HxW bool, checked first (`check_rle`): a malformed RLE raises TrajectoryFormatError."""
    h, w, counts = check_rle(rle, max_pixels)
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
        """The trajectory of a schema dict; anything malformed raises TrajectoryFormatError naming the field."""
        if not isinstance(d, dict):
            raise TrajectoryFormatError(f"a trajectory is a JSON object, got {type(d).__name__}")
        version = str(d.get("version"))
        if version != TRAJECTORY_VERSION:
            raise TrajectoryFormatError(
                f"trajectory version {version!r} is not supported; this IBISAgent reads version {TRAJECTORY_VERSION}"
            )
        if "image_size" not in d:
            raise TrajectoryFormatError("a trajectory needs 'image_size': [H, W]")
        size = check_size(d["image_size"], what="image_size")
        where = "the trajectory"
        try:
            steps = []
            for n, s in enumerate(_listed(d.get("steps", []), "steps")):
                where = f"steps[{n}]"
                steps.append(Step.from_dict(s))
                _check_sizes(steps[-1].masks, size, where)
            where = "initial_masks"
            initial = {t: decode_mask(m) for t, m in dict(d.get("initial_masks") or {}).items()}
            _check_sizes(initial, size, where)
            where = "the trajectory"
            return cls(
                instruction=str(d["instruction"]),
                image_size=size,
                targets=list(d["targets"]),
                dialect=d.get("dialect", "ibis"),
                steps=steps,
                initial_masks=initial,
                answer=d.get("answer"),
                stop_reason=d.get("stop_reason"),
                meta=d.get("meta", {}),
            )
        except (
            TrajectoryFormatError,
            KeyError,
            TypeError,
            ValueError,
            AttributeError,
            IndexError,
            OverflowError,
        ) as exc:
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise TrajectoryFormatError(f"{where}: {detail}") from exc

    def to_json(self, path: str | Path | None = None, indent: int | None = None) -> str:
        return write_json(self.to_dict(), path, indent)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Trajectory:
        """A trajectory from JSON text or a file path; unreadable JSON raises TrajectoryFormatError."""
        return cls.from_dict(read_json(text_or_path, "a trajectory"))


def write_json(document: dict, path: str | Path | None = None, indent: int | None = None) -> str:
    """`document` as JSON text, also written to `path` when given (trajectories and volume records)."""
    text = json.dumps(document, indent=indent)
    if path is not None:
        Path(path).write_text(text)
    return text


def read_json(text_or_path: str | Path, what: str):
    """The JSON value of `text_or_path` (JSON text, or the path of a file holding it); unreadable JSON raises
    TrajectoryFormatError saying it is not `what`."""
    text = str(text_or_path)
    try:
        if not text.lstrip().startswith(("{", "[")):
            text = Path(text_or_path).read_text(encoding="utf-8")
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise TrajectoryFormatError(f"not {what}: the JSON cannot be read ({type(exc).__name__}: {exc})") from exc


def _listed(value, what: str) -> list:
    if not isinstance(value, list):
        raise TrajectoryFormatError(f"{what} must be a list, got {type(value).__name__}")
    return value


def _check_sizes(masks: dict[str, np.ndarray], size: tuple[int, int], where: str) -> None:
    for t, m in masks.items():
        if m.shape != size:
            raise TrajectoryFormatError(f"mask {t!r} is {list(m.shape)}, expected image_size {list(size)}")
