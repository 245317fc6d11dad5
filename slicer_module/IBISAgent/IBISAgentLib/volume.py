"""The volume mode's side of the contract with the server's 3D task `ibisagent_volume`: the request (checked before
anything is sent), the result summary (schema "volume-1", read with checks), the full "volume-1" record when a server
sends it, and the progress report of a running request. Standard library + numpy, like the rest of IBISAgentLib.

Request params (POST /infer/ibisagent_volume?image=<id>): instruction, label, target, axis (0/1/2), key_slice,
foreground / background (voxel indices [i, j, k]; on a new session the key slice's points are the user's clicks, on a
repair the repaired slice's), run_agent, max_steps, first_slice / last_slice (the propagation range), repair_budget,
auto_repair, progress_id (32 lowercase hex, made by the client so it can poll before the answer comes), and for a
continuation session_id + action ("repair" | "undo_slice" | "propagate" | "accept") + slice.

Result summary (the JSON beside the label file): {"schema": "volume-1", "session_id", "image", "axis", "key_slice",
"range": [first, last], "slices": [{"index", "status": "key"|"propagated"|"absent"|"repaired", "source", "score",
"flagged", "reasons", "reviewed", "area"}], "flagged": [index], "repairs_used", "repair_budget", "changed": [index],
"ignored_points", "stop_reason", "seconds", optional "trajectories": {"<slice index>": 2D trajectory (version 1)}
of key and repaired slices}. The label file is the whole volume's label (uint8 0/1) in the image's
geometry. Progress (GET /ibisagent/progress/<progress_id>): {"state": "running"|"done"|"failed", "phase",
"slices_done", "slices_total", "seconds"}.

A 2D trajectory (version "1") and any other schema are refused with a message naming the reader or the update needed,
as `TrajectoryView` refuses a volume record. Every malformed field raises `VolumeFormatError` naming it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np

from IBISAgentLib.trajectory import (
    MAX_MASK_PIXELS,
    SUPPORTED_VERSIONS,
    TrajectoryFormatError,
    TrajectoryView,
    UnsupportedTrajectoryVersion,
    check_rle,
    decode_rle,
)

VOLUME_MODEL = "ibisagent_volume"
VOLUME_SCHEMA = "volume-1"
SUPPORTED_VOLUME_SCHEMAS = (VOLUME_SCHEMA,)
ACTIONS = ("repair", "undo_slice", "propagate", "accept")
STATUSES = ("key", "propagated", "absent", "repaired")
PROGRESS_STATES = ("running", "done", "failed")
MAX_SLICES = 2**16  # more slices than any scanner writes: a longer list is not a volume summary
_PROGRESS_ID = re.compile(r"[0-9a-f]{32}")
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RecursionError, MemoryError)


class VolumeFormatError(TrajectoryFormatError):
    """The volume summary, record or progress JSON does not follow the schema; the message names the field."""


class UnsupportedVolumeSchema(VolumeFormatError, UnsupportedTrajectoryVersion):
    """The answer is in a schema this module cannot read as a volume (a 2D trajectory, an older or newer version)."""


def new_progress_id() -> str:
    """A fresh progress id: 32 lowercase hex digits (what the server's progress endpoint takes)."""
    return uuid.uuid4().hex


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _int(d: dict, key: str, where: str, minimum: int | None = 0, optional: bool = False) -> int | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if not _is_int(v) or (minimum is not None and v < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise VolumeFormatError(f"{where}'{key}' must be an integer{bound}, got {str(v)[:60]}")
    return int(v)


def _indices(v, where: str) -> list[int]:
    if not isinstance(v, list) or len(v) > MAX_SLICES or not all(_is_int(x) and x >= 0 for x in v):
        raise VolumeFormatError(f"{where} must be a list of slice indices (integers >= 0), got {str(v)[:80]}")
    return [int(x) for x in v]


def _check_schema(d, key: str, what: str) -> None:
    """Refuse anything but a volume-1 object, saying what it is instead and what to do."""
    if not isinstance(d, dict):
        raise VolumeFormatError(f"a {what} is a JSON object, got {type(d).__name__}")
    schema = d.get(key, d.get("version"))
    if "trajectory" in d and key not in d or str(schema) in SUPPORTED_VERSIONS:
        raise UnsupportedVolumeSchema(
            f"this is a 2D answer (trajectory version {str(d.get('version', schema))[:20]!r}), not a {what}: it "
            "comes from the 2D task 'ibisagent'; read it with TrajectoryView, or ask the 'ibisagent_volume' task"
        )
    if str(schema) not in SUPPORTED_VOLUME_SCHEMAS:
        raise UnsupportedVolumeSchema(
            f"{what} schema {str(schema)[:40]!r} is not supported by this Slicer module (it reads "
            f"{', '.join(SUPPORTED_VOLUME_SCHEMAS)}); update the IBISAgent Slicer module and the server to the same "
            "release"
        )


# -- request ------------------------------------------------------------------------------------------------------
@dataclass
class VolumeRequest:
    """One request to the 3D task: a new session (session_id None: segment `key_slice`, then propagate) or a
    continuation (`session_id` + `action` + `slice` where the action is about one slice).

    foreground / background: integer voxel indices [i, j, k] (the key slice's, or the repaired slice's).
    first_slice / last_slice: the propagation range along `axis` (None: until the object ends).
    repair_budget: slices the agent may repair (None: the server's default); auto_repair: repair flagged slices
    right after propagating.
    """

    instruction: str
    axis: int = 2
    key_slice: int | None = None
    foreground: list[list[int]] = field(default_factory=list)
    background: list[list[int]] = field(default_factory=list)
    label: str | None = None
    target: str | None = None
    run_agent: bool = True
    max_steps: int = 10
    first_slice: int | None = None
    last_slice: int | None = None
    repair_budget: int | None = None
    auto_repair: bool | None = None
    session_id: str | None = None
    action: str | None = None
    slice: int | None = None
    progress_id: str | None = None

    def check(self, dims_ijk=None) -> None:
        """Raise ValueError, saying what to change, for a request the server would refuse. dims_ijk: the volume's
        (I, J, K), to check slice indices and points against it."""
        if not (self.instruction or "").strip():
            raise ValueError("write an instruction, e.g. 'segment the liver tumor'")
        if self.axis not in (0, 1, 2) or isinstance(self.axis, bool):
            raise ValueError(f"axis must be 0, 1 or 2 (an IJK axis), got {self.axis!r}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max steps must be a whole number of at least 1, got {self.max_steps!r}")
        n = None if dims_ijk is None else int(dims_ijk[self.axis])
        for name in ("key_slice", "first_slice", "last_slice", "slice"):
            v = getattr(self, name)
            if v is None:
                continue
            if not _is_int(v) or v < 0 or (n is not None and v >= n):
                bound = "" if n is None else f" (0..{n - 1} along axis {self.axis})"
                raise ValueError(f"{name} {v!r} must be a slice index{bound}")
        if self.first_slice is not None and self.last_slice is not None and self.first_slice > self.last_slice:
            raise ValueError(f"the range is reversed: first slice {self.first_slice} > last slice {self.last_slice}")
        if self.repair_budget is not None and (not _is_int(self.repair_budget) or self.repair_budget < 0):
            raise ValueError(f"repair budget must be 0 or more, got {self.repair_budget!r}")
        if self.progress_id is not None and not (
            isinstance(self.progress_id, str) and _PROGRESS_ID.fullmatch(self.progress_id)
        ):
            raise ValueError(
                f"progress_id must be 32 lowercase hex digits (new_progress_id()), got {self.progress_id!r}"
            )
        for name in ("foreground", "background"):
            for point in getattr(self, name):
                if not isinstance(point, (list, tuple)) or len(point) != 3 or not all(_is_int(v) for v in point):
                    raise ValueError(f"{name} point {point!r} must be integer voxel indices [i, j, k]")
                if dims_ijk is not None and not all(0 <= v < int(d) for v, d in zip(point, dims_ijk)):
                    raise ValueError(f"{name} point {list(point)} is outside the volume {list(dims_ijk)}")
        points = self.foreground or self.background
        if self.session_id is None:
            if self.action is not None or self.slice is not None:
                raise ValueError("an action on a slice needs a session; run on the key slice first")
            if self.key_slice is None:
                raise ValueError("choose the key slice (the slice to segment first)")
            if not self.run_agent and not points:
                raise ValueError("place positive or negative points on the key slice first (or let the agent run)")
            return
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)} for a session, got {self.action!r}")
        if self.action in ("repair", "undo_slice", "accept") and self.slice is None:
            raise ValueError(f"action {self.action!r} needs the slice it is about")
        if self.action == "repair" and not self.run_agent and not points:
            raise ValueError("place positive or negative points on the slice to repair first (or let the agent repair)")
        if self.action != "repair" and points:
            raise ValueError(f"points are taken by a new session or a repair, not by action {self.action!r}")
        if points and self.action == "repair":
            slice_of = {p[self.axis] for p in (self.foreground + self.background)}
            if slice_of != {self.slice}:
                raise ValueError(
                    f"the points lie on slices {sorted(slice_of)} along axis {self.axis}; a repair of slice "
                    f"{self.slice} takes points on that slice only"
                )

    def to_params(self, dims_ijk=None) -> dict:
        """The checked request as the JSON params object (unset optional fields left out)."""
        self.check(dims_ijk)
        params = asdict(self)
        params["instruction"] = self.instruction.strip()
        params["foreground"] = [[int(v) for v in p] for p in self.foreground]
        params["background"] = [[int(v) for v in p] for p in self.background]
        return {k: v for k, v in params.items() if v is not None and v != []}


# -- result summary -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SliceStatus:
    """One slice of the volume session as the status list shows it. area: mask pixels on that slice."""

    index: int
    status: str
    source: str = ""
    score: float | None = None
    flagged: bool = False
    reasons: tuple[str, ...] = ()
    reviewed: bool = False
    area: int | None = None

    def describe(self) -> str:
        """One line for the status list: index, status, source, score, area, flag and its reasons."""
        parts = [f"{self.index:4d}  {self.status}"]
        if self.source:
            parts.append(f"by {self.source}")
        if self.score is not None:
            parts.append(f"score {self.score:.2f}")
        if self.area is not None:
            parts.append(f"{self.area} px")
        if self.flagged:
            parts.append("FLAGGED" + (f": {'; '.join(self.reasons)}" if self.reasons else ""))
        elif self.reviewed:
            parts.append("reviewed")
        return "  ".join(parts)

    @classmethod
    def from_dict(cls, d, where: str) -> SliceStatus:
        if not isinstance(d, dict):
            raise VolumeFormatError(f"{where} must be an object, got {type(d).__name__}")
        status = d.get("status")
        if status not in STATUSES:
            raise VolumeFormatError(f"{where}.status {str(status)[:40]!r} is not one of {', '.join(STATUSES)}")
        score, area = d.get("score"), d.get("area")
        if score is not None and not (_is_number(score) and np.isfinite(score)):
            raise VolumeFormatError(f"{where}.score must be a number, got {str(score)[:40]}")
        if area is not None and not (_is_int(area) and area >= 0):
            raise VolumeFormatError(f"{where}.area must be a pixel count >= 0, got {str(area)[:40]}")
        reasons = d.get("reasons") or []
        if not isinstance(reasons, list):
            raise VolumeFormatError(f"{where}.reasons must be a list of texts, got {type(reasons).__name__}")
        for name in ("flagged", "reviewed"):
            if not isinstance(d.get(name, False), bool):
                raise VolumeFormatError(f"{where}.{name} must be true or false, got {str(d.get(name))[:40]}")
        return cls(
            index=_int(d, "index", f"{where}."),
            status=status,
            source=str(d.get("source") or "")[:80],
            score=None if score is None else float(score),
            flagged=d.get("flagged", False),
            reasons=tuple(str(r)[:200] for r in reasons),
            reviewed=d.get("reviewed", False),
            area=None if area is None else int(area),
        )


@dataclass
class VolumeResult:
    """The summary of one answer of the 3D task (see the module docstring); `slices` sorted by index."""

    session_id: str
    image: str
    axis: int
    key_slice: int | None
    range: tuple[int, int]
    slices: list[SliceStatus]
    flagged: list[int]
    changed: list[int]
    repairs_used: int = 0
    repair_budget: int | None = None
    ignored_points: list = field(default_factory=list)
    stop_reason: str | None = None
    seconds: float | None = None
    schema: str = VOLUME_SCHEMA
    trajectories: dict[int, TrajectoryView] = field(default_factory=dict, repr=False)
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d, num_slices: int | None = None) -> VolumeResult:
        """The summary of a result dict. num_slices: the volume's slice count along the axis, when known (indices
        are checked against it). Anything malformed raises VolumeFormatError naming the field; a 2D answer or
        another schema raises UnsupportedVolumeSchema."""
        _check_schema(d, "schema", "volume result")
        where = "the volume result: "
        try:
            session_id = d.get("session_id")
            if not isinstance(session_id, str) or not session_id:
                raise VolumeFormatError(f"{where}'session_id' must be a non-empty text, got {str(session_id)[:60]}")
            axis = _int(d, "axis", where)
            if axis not in (0, 1, 2):
                raise VolumeFormatError(f"{where}'axis' must be 0, 1 or 2, got {axis}")
            key = _int(d, "key_slice", where, optional=True)
            span = d.get("range")
            if not isinstance(span, list) or len(span) != 2 or not all(_is_int(v) and v >= 0 for v in span):
                raise VolumeFormatError(f"{where}'range' must be [first, last] slice indices, got {str(span)[:60]}")
            first, last = int(span[0]), int(span[1])
            if first > last:
                raise VolumeFormatError(f"{where}'range' [{first}, {last}] is reversed")
            raw_slices = d.get("slices")
            if not isinstance(raw_slices, list) or len(raw_slices) > MAX_SLICES:
                raise VolumeFormatError(f"{where}'slices' must be a list of at most {MAX_SLICES} slice objects")
            slices = [SliceStatus.from_dict(s, f"slices[{n}]") for n, s in enumerate(raw_slices)]
            indices = [s.index for s in slices]
            if len(set(indices)) != len(indices):
                raise VolumeFormatError(f"{where}'slices' lists a slice twice")
            limit = num_slices if num_slices is not None else None
            for s in slices:
                if limit is not None and s.index >= limit:
                    raise VolumeFormatError(
                        f"{where}slice {s.index} is outside the volume ({limit} slices along axis {axis})"
                    )
            if limit is not None and last >= limit:
                raise VolumeFormatError(f"{where}'range' [{first}, {last}] runs past the volume's {limit} slices")
            if key is not None and limit is not None and key >= limit:
                raise VolumeFormatError(f"{where}'key_slice' {key} is outside the volume ({limit} slices)")
            flagged = _indices(d.get("flagged", []), f"{where}'flagged'")
            listed = set(indices)
            if not set(flagged) <= listed:
                raise VolumeFormatError(
                    f"{where}'flagged' names slices {sorted(set(flagged) - listed)[:10]} that 'slices' does not list"
                )
            if sorted(flagged) != sorted(s.index for s in slices if s.flagged):
                raise VolumeFormatError(f"{where}'flagged' does not match the slices marked flagged")
            changed = _indices(d.get("changed", []), f"{where}'changed'")
            seconds = d.get("seconds")
            if seconds is not None and not (_is_number(seconds) and seconds >= 0):
                raise VolumeFormatError(f"{where}'seconds' must be a number >= 0, got {str(seconds)[:40]}")
            trajectories = {}
            raw_trajectories = d.get("trajectories") or {}
            if not isinstance(raw_trajectories, dict):
                raise VolumeFormatError(f"{where}'trajectories' must be an object {{slice index: trajectory}}")
            for name, t in raw_trajectories.items():
                index = int(name) if isinstance(name, str) and name.isdigit() else None
                if index is None or index not in listed:
                    raise VolumeFormatError(f"{where}'trajectories' key {str(name)[:20]!r} is not a listed slice")
                try:
                    trajectories[index] = TrajectoryView.from_dict(t)
                except TrajectoryFormatError as exc:
                    raise VolumeFormatError(f"{where}trajectories[{index}]: {exc}") from exc
            ignored = d.get("ignored_points") or []
            if not isinstance(ignored, list):
                raise VolumeFormatError(f"{where}'ignored_points' must be a list, got {type(ignored).__name__}")
            return cls(
                session_id=session_id,
                image=str(d.get("image") or ""),
                axis=axis,
                key_slice=key,
                range=(first, last),
                slices=sorted(slices, key=lambda s: s.index),
                flagged=sorted(flagged),
                changed=sorted(set(changed)),
                repairs_used=_int(d, "repairs_used", where) if "repairs_used" in d else 0,
                repair_budget=_int(d, "repair_budget", where, optional=True),
                ignored_points=ignored,
                stop_reason=None if d.get("stop_reason") is None else str(d["stop_reason"])[:500],
                seconds=None if seconds is None else float(seconds),
                schema=str(d.get("schema")),
                trajectories=trajectories,
                raw=d,
            )
        except TrajectoryFormatError:
            raise
        except _MALFORMED as exc:
            raise VolumeFormatError(f"{where}malformed ({type(exc).__name__}: {str(exc)[:200]})") from exc

    @classmethod
    def from_json(cls, text: str | bytes, num_slices: int | None = None) -> VolumeResult:
        try:
            data = json.loads(text)
        except _MALFORMED as exc:
            raise VolumeFormatError(f"the volume result JSON cannot be read ({type(exc).__name__}: {exc})") from exc
        return cls.from_dict(data, num_slices)

    def status(self, index: int) -> SliceStatus | None:
        """The slice's entry, or None when the session has no record of it."""
        for s in self.slices:
            if s.index == index:
                return s
        return None

    @property
    def indices(self) -> list[int]:
        """The slices the session has a record of (every status, "absent" included), in order."""
        return [s.index for s in self.slices]


# -- the full record ----------------------------------------------------------------------------------------------
@dataclass
class VolumeRecordView:
    """A "volume-1" record (the core's `ibisagent.volume.record`), for a server that sends it: per slice its status,
    its RLE mask (checked, not decoded, until asked for) and, for key and repaired slices, the 2D trajectory."""

    volume_shape: tuple[int, int, int]
    axis: int
    slice_size: tuple[int, int]
    instruction: str
    key_slice: int | None
    slices: list[SliceStatus]
    masks_rle: dict[int, dict]
    trajectories: dict[int, TrajectoryView]
    range: tuple[int, int] | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, max_pixels: int = MAX_MASK_PIXELS) -> VolumeRecordView:
        _check_schema(d, "version", "volume record")
        where = "the volume record: "
        try:
            shape = d.get("volume_shape")
            if not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(v) and v > 0 for v in shape):
                raise VolumeFormatError(f"{where}'volume_shape' must be [I, J, K] positive integers, got {shape!r:.60}")
            axis = _int(d, "axis", where)
            if axis not in (0, 1, 2):
                raise VolumeFormatError(f"{where}'axis' must be 0, 1 or 2, got {axis}")
            size = d.get("slice_size")
            remaining = [int(shape[a]) for a in range(3) if a != axis]
            if size != remaining[::-1]:
                raise VolumeFormatError(
                    f"{where}'slice_size' {str(size)[:40]} is not [H, W] = {remaining[::-1]} of a slice along axis "
                    f"{axis} of volume_shape {shape}"
                )
            if remaining[0] * remaining[1] > max_pixels:
                raise VolumeFormatError(f"{where}slices of {size} are above the limit of {max_pixels} pixels")
            raw_slices = d.get("slices") or []
            if not isinstance(raw_slices, list) or len(raw_slices) > int(shape[axis]):
                raise VolumeFormatError(f"{where}'slices' must be a list of at most {shape[axis]} slices")
            slices, masks, trajectories = [], {}, {}
            for n, s in enumerate(raw_slices):
                status = SliceStatus.from_dict(s, f"slices[{n}]")
                if status.index >= shape[axis] or status.index in masks:
                    raise VolumeFormatError(f"slices[{n}].index {status.index} is outside the volume or repeated")
                try:
                    h, w, _ = check_rle(s.get("mask"), max_pixels)
                    if s.get("trajectory") is not None:
                        trajectories[status.index] = TrajectoryView.from_dict(s["trajectory"])
                except TrajectoryFormatError as exc:
                    if isinstance(exc, VolumeFormatError):
                        raise
                    raise VolumeFormatError(f"slices[{n}]: {exc}") from exc
                if [h, w] != size:
                    raise VolumeFormatError(f"slices[{n}].mask has size {[h, w]}, expected slice_size {size}")
                masks[status.index] = s["mask"]
                slices.append(status)
            span = d.get("range")
            return cls(
                volume_shape=tuple(int(v) for v in shape),
                axis=axis,
                slice_size=(int(size[0]), int(size[1])),
                instruction=str(d.get("instruction") or ""),
                key_slice=_int(d, "key_slice", where, optional=True),
                slices=sorted(slices, key=lambda s: s.index),
                masks_rle=masks,
                trajectories=trajectories,
                range=None if span is None else (int(span[0]), int(span[1])),
                meta=dict(d.get("meta") or {}),
            )
        except TrajectoryFormatError:
            raise
        except _MALFORMED as exc:
            raise VolumeFormatError(f"{where}malformed ({type(exc).__name__}: {str(exc)[:200]})") from exc

    def mask(self, index: int) -> np.ndarray:
        """HxW bool mask of slice `index` (all False for a slice without a record)."""
        rle = self.masks_rle.get(index)
        return np.zeros(self.slice_size, bool) if rle is None else decode_rle(rle)


# -- progress -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeProgress:
    """The state of a running request (GET /ibisagent/progress/<id>)."""

    state: str
    phase: str = ""
    slices_done: int = 0
    slices_total: int | None = None
    seconds: float | None = None

    @classmethod
    def from_dict(cls, d) -> VolumeProgress:
        where = "the progress report: "
        if not isinstance(d, dict):
            raise VolumeFormatError(f"{where}expected a JSON object, got {type(d).__name__}")
        if d.get("state") not in PROGRESS_STATES:
            raise VolumeFormatError(f"{where}'state' {str(d.get('state'))[:40]!r} is not one of {PROGRESS_STATES}")
        seconds = d.get("seconds")
        if seconds is not None and not (_is_number(seconds) and seconds >= 0):
            raise VolumeFormatError(f"{where}'seconds' must be a number >= 0, got {str(seconds)[:40]}")
        return cls(
            state=d["state"],
            phase=str(d.get("phase") or "")[:80],
            slices_done=_int(d, "slices_done", where) if d.get("slices_done") is not None else 0,
            slices_total=_int(d, "slices_total", where, optional=True),
            seconds=None if seconds is None else float(seconds),
        )

    def describe(self) -> str:
        """One line for the progress text."""
        done = f"{self.slices_done}/{self.slices_total}" if self.slices_total else str(self.slices_done)
        elapsed = f", {self.seconds:.0f} s" if self.seconds is not None else ""
        return f"{self.phase or self.state}: {done} slices{elapsed}"
