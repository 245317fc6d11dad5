"""The audit: per-slice signals of a propagated volume and the rules that flag suspicious slices for repair.

Signals of slice i (masks HxW bool in slice pixels): the propagator's object score; the area and its ratio to the
non-empty neighbours i-1, i+1; and the overlap with each neighbour as containment |a & b| / min(|a|, |b|) (a
tapering end slice lies inside its neighbour: containment near 1, where Dice would be low). A slice is flagged
when it disagrees with *every* non-empty neighbour, so the neighbours of one bad slice stay unflagged:

* ``low_score``: object score below `min_score`;
* ``gap``: empty between two non-empty neighbours (the propagation dropped the object);
* ``leak``: larger than every neighbour by more than `area_ratio`x (also at an end: objects do not widen there);
* ``shrink``: smaller than both neighbours by more than `area_ratio`x;
* ``shift``: containment below `min_overlap` with every non-empty neighbour.

One rule looks along the volume instead: propagation drifts (each slice inherits its neighbour's errors and adds
its own, so a slow leak or shrink passes every neighbour rule), so

* ``drift``: a non-empty propagated slice exactly `max_gap` slices from the nearest anchor or reviewed slice (the
  signal ``distance``) is shown for review; once reviewed or repaired, the next one `max_gap` further on is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class AuditSpec:
    """Thresholds of the audit rules (see the module docstring)."""

    min_score: float = field(default=0.3, metadata={"help": "flag slices whose object score is below this"})
    area_ratio: float = field(default=1.6, metadata={"help": "flag area jumps beyond this factor vs the neighbours"})
    min_overlap: float = field(default=0.5, metadata={"help": "flag slices overlapping no neighbour this much"})
    max_gap: int = field(
        default=3,
        metadata={
            "help": "flag a propagated slice this many slices from the nearest anchor or reviewed "
            "slice for review (0: never)"
        },
    )

    def __post_init__(self) -> None:
        if not 0 <= self.min_score <= 1 or not 0 <= self.min_overlap <= 1 or self.area_ratio < 1 or self.max_gap < 0:
            raise ValueError(
                f"AuditSpec: min_score and min_overlap must lie in [0, 1], area_ratio >= 1 and max_gap >= 0, got {self}"
            )


def containment(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / min(|a|, |b|) of two HxW bool masks; 0.0 when either is empty."""
    small = min(int(a.sum()), int(b.sum()))
    return float((a & b).sum()) / small if small else 0.0


def slice_signals(
    mask: np.ndarray, score: float, prev: np.ndarray | None, nxt: np.ndarray | None, distance: int | None = None
) -> dict:
    """The signals of one slice given its neighbours' masks (None: outside the segmented range) and its distance in
    slices to the nearest anchor or reviewed slice (None: not known; the drift rule is then off)."""
    area = int(mask.sum())
    out: dict = {"score": float(score), "area": area}
    if distance is not None:
        out["distance"] = int(distance)
    for name, other in (("prev", prev), ("next", nxt)):
        if other is not None and other.any():
            out[f"area_ratio_{name}"] = area / float(other.sum())
            out[f"overlap_{name}"] = containment(mask, other)
    return out


def flag_reasons(signals: dict, spec: AuditSpec, prev_area: int | None, next_area: int | None) -> list[str]:
    """The audit rules that `signals` (from `slice_signals`) break; neighbour areas None: no neighbour there."""
    reasons = []
    neighbours = [a for a in (prev_area, next_area) if a]
    area = signals["area"]
    if area == 0:
        if len(neighbours) == 2:
            reasons.append("gap")
        return reasons
    if signals["score"] < spec.min_score:
        reasons.append("low_score")
    if neighbours and all(area > spec.area_ratio * a for a in neighbours):
        reasons.append("leak")
    if len(neighbours) == 2 and all(area * spec.area_ratio < a for a in neighbours):
        reasons.append("shrink")
    overlaps = [signals[f"overlap_{n}"] for n in ("prev", "next") if f"overlap_{n}" in signals]
    if overlaps and all(o < spec.min_overlap for o in overlaps):
        reasons.append("shift")
    if spec.max_gap and signals.get("distance") == spec.max_gap:
        reasons.append("drift")
    return reasons
