"""The volume record: one serialisable object for a whole volume session — per slice its mask, how it came about
(key, propagated, repaired; by the agent, the user or the propagation), its audit signals and, for key and repaired
slices, the 2D trajectory of that slice's session. It embeds 2D trajectories and leaves their schema unchanged.

JSON schema (version VOLUME_VERSION, "volume-1"); masks are RLE of the HxW slice image (`ibisagent.trajectory`),
clicks and masks are in slice pixels (`ibisagent.geometry`: slice s along `axis` is `take_slice(volume, s, axis)`):

    {"version": "volume-1", "kind": "volume", "instruction": str, "target": str, "dialect": str,
     "volume_shape": [I, J, K], "axis": 0|1|2, "slice_size": [H, W], "key_slice": int|null,
     "range": [first, last], "repair_budget": int|null, "repairs_used": int, "tool": str, "propagator": str,
     "slices": [{"index": int, "status": "key"|"propagated"|"repaired"|"absent",
                 "source": "agent"|"user"|"agent+user"|"propagation", "mask": RLE, "score": float,
                 "flagged": bool, "reasons": [str], "reviewed": bool, "signals": {name: float},
                 "trajectory": <2D trajectory, schema version 1>|null}],
     "meta": {...}}

"absent" slices end the propagation (the object score said absent); their mask is empty. A 2D trajectory reader
(`Trajectory.from_dict`, the Slicer library) refuses this record by its version; `VolumeRecord.from_dict` refuses
a 2D trajectory and names the reader to use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ibisagent.trajectory import (
    TRAJECTORY_VERSION,
    Trajectory,
    TrajectoryFormatError,
    decode_mask,
    encode_mask,
    read_json,
    write_json,
)

VOLUME_VERSION = "volume-1"
STATUSES = ("key", "propagated", "repaired", "absent")


@dataclass
class SliceRecord:
    """One slice of a volume session. mask: HxW bool in slice pixels."""

    index: int
    status: str
    source: str
    mask: np.ndarray
    score: float = 1.0
    flagged: bool = False
    reasons: list[str] = field(default_factory=list)
    reviewed: bool = False
    signals: dict = field(default_factory=dict)
    trajectory: Trajectory | None = None

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "status": self.status,
            "source": self.source,
            "mask": encode_mask(self.mask),
            "score": float(self.score),
            "flagged": self.flagged,
            "reasons": list(self.reasons),
            "reviewed": self.reviewed,
            "signals": dict(self.signals),
            "trajectory": None if self.trajectory is None else self.trajectory.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> SliceRecord:
        if d["status"] not in STATUSES:
            raise TrajectoryFormatError(f"status {d['status']!r} is not one of {', '.join(STATUSES)}")
        return cls(
            index=int(d["index"]),
            status=d["status"],
            source=str(d["source"]),
            mask=decode_mask(d["mask"]),
            score=float(d.get("score", 1.0)),
            flagged=bool(d.get("flagged", False)),
            reasons=[str(r) for r in d.get("reasons", [])],
            reviewed=bool(d.get("reviewed", False)),
            signals=dict(d.get("signals", {})),
            trajectory=None if d.get("trajectory") is None else Trajectory.from_dict(d["trajectory"]),
        )


@dataclass
class VolumeRecord:
    """A whole volume session (see the module docstring for its JSON). `slices` are in index order."""

    instruction: str
    target: str
    volume_shape: tuple[int, int, int]
    axis: int
    slice_size: tuple[int, int]
    dialect: str = "ibis"
    key_slice: int | None = None
    range: tuple[int, int] | None = None
    repair_budget: int | None = None
    repairs_used: int = 0
    tool: str = ""
    propagator: str = ""
    slices: list[SliceRecord] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def label_volume(self) -> np.ndarray:
        """The (I, J, K) bool label of all slices' masks."""
        from ibisagent.geometry import put_slice

        out = np.zeros(self.volume_shape, bool)
        for s in self.slices:
            if s.mask.any():
                put_slice(out, s.index, self.axis, s.mask)
        return out

    @property
    def num_clicks(self) -> int:
        """Clicks spent on key and repaired slices (the 2D trajectories' clicks)."""
        return sum(s.trajectory.num_clicks for s in self.slices if s.trajectory is not None)

    def to_dict(self) -> dict:
        return {
            "version": VOLUME_VERSION,
            "kind": "volume",
            "instruction": self.instruction,
            "target": self.target,
            "dialect": self.dialect,
            "volume_shape": list(self.volume_shape),
            "axis": self.axis,
            "slice_size": list(self.slice_size),
            "key_slice": self.key_slice,
            "range": None if self.range is None else list(self.range),
            "repair_budget": self.repair_budget,
            "repairs_used": self.repairs_used,
            "tool": self.tool,
            "propagator": self.propagator,
            "slices": [s.to_dict() for s in self.slices],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> VolumeRecord:
        """The record of a schema dict; a 2D trajectory, another version or a malformed field raises
        TrajectoryFormatError naming it."""
        if not isinstance(d, dict):
            raise TrajectoryFormatError(f"a volume record is a JSON object, got {type(d).__name__}")
        version = str(d.get("version"))
        if version == TRAJECTORY_VERSION:
            raise TrajectoryFormatError(
                f"this is a 2D trajectory (version {version}), not a volume record; read it with "
                "ibisagent.trajectory.Trajectory.from_dict"
            )
        if version != VOLUME_VERSION:
            raise TrajectoryFormatError(
                f"volume record version {version!r} is not supported; this IBISAgent reads version {VOLUME_VERSION}"
            )
        where = "the volume record"
        try:
            shape = tuple(int(v) for v in d["volume_shape"])
            size = tuple(int(v) for v in d["slice_size"])
            if len(shape) != 3 or len(size) != 2:
                raise TrajectoryFormatError(f"volume_shape {shape} / slice_size {size}: expected [I, J, K] / [H, W]")
            slices = []
            for n, s in enumerate(d.get("slices", [])):
                where = f"slices[{n}]"
                slices.append(SliceRecord.from_dict(s))
                if slices[-1].mask.shape != size:
                    raise TrajectoryFormatError(
                        f"mask is {list(slices[-1].mask.shape)}, expected slice_size {list(size)}"
                    )
                if not 0 <= slices[-1].index < shape[int(d["axis"])]:
                    raise TrajectoryFormatError(
                        f"index {slices[-1].index} is outside the volume along axis {d['axis']}"
                    )
            where = "the volume record"
            return cls(
                instruction=str(d["instruction"]),
                target=str(d["target"]),
                volume_shape=shape,
                axis=int(d["axis"]),
                slice_size=size,
                dialect=str(d.get("dialect", "ibis")),
                key_slice=d.get("key_slice"),
                range=None if d.get("range") is None else tuple(int(v) for v in d["range"]),
                repair_budget=d.get("repair_budget"),
                repairs_used=int(d.get("repairs_used", 0)),
                tool=str(d.get("tool", "")),
                propagator=str(d.get("propagator", "")),
                slices=slices,
                meta=dict(d.get("meta", {})),
            )
        except (TrajectoryFormatError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise TrajectoryFormatError(f"{where}: {detail}") from exc

    def to_json(self, path: str | Path | None = None, indent: int | None = None) -> str:
        return write_json(self.to_dict(), path, indent)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> VolumeRecord:
        return cls.from_dict(read_json(text_or_path, "a volume record"))
