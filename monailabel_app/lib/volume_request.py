"""The ibisagent_volume task's request: its parameters, type-checked and bounded before anything is read.

`VOLUME_FIELDS` are the parameter names the task reads (the contract in monailabel_app/README.md, "The volume task").
Points are [i, j, k] voxel indices of the volume (`ibisagent.geometry`: along axis a the slice is index a, and the
two other indices in order are the slice pixel (x, y)).
"""

from __future__ import annotations

from dataclasses import dataclass

from ibisagent.geometry import voxel_to_pixel
from ibisagent.types import MAX_INSTRUCTION_CHARS

from .errors import RequestError
from .request import UPLOAD_KEY, _int, _points, _short, show

VOLUME_FIELDS = (
    "instruction",
    "label",
    "target",
    "axis",
    "key_slice",
    "foreground",
    "background",
    "run_agent",
    "max_steps",
    "first_slice",
    "last_slice",
    "repair_budget",
    "auto_repair",
    "session_id",
    "action",
    "slice",
    "progress_id",
)
ACTIONS = ("repair", "undo_slice", "propagate", "accept")
_MAX_NAME = 200


class _Fields(dict):
    """The request, read only through the names in VOLUME_FIELDS."""

    def get(self, name: str, default=None):
        if name not in VOLUME_FIELDS:
            raise KeyError(f"{name!r} is not in volume_request.VOLUME_FIELDS")
        return super().get(name, default)


@dataclass
class VolumeParams:
    """The request's parameters, type-checked (ranges that need the volume are checked by `check_*` below)."""

    instruction: str | None
    label_name: str | None
    label_file: str | None
    target: str | None
    axis: int | None
    key_slice: int | None
    foreground: list[list[float]]
    background: list[list[float]]
    run_agent: bool
    max_steps: int
    first_slice: int | None
    last_slice: int | None
    repair_budget: int | None
    auto_repair: bool
    session_id: str | None
    action: str | None
    slice: int | None
    progress_id: str | None

    @classmethod
    def parse(cls, request: dict, step_limit: int, max_clicks: int, run_agent_default: bool) -> VolumeParams:
        label_file = request.get(UPLOAD_KEY)
        request = _Fields(request)
        instruction = request.get("instruction")
        if instruction is not None:
            if not isinstance(instruction, str) or not instruction.strip():
                raise RequestError(
                    400,
                    f"params.instruction must be a non-empty string such as 'segment the liver', got {show(instruction)}",
                )
            instruction = _short(instruction.strip(), "params.instruction", MAX_INSTRUCTION_CHARS)
        label = request.get("label")
        if label is not None and not isinstance(label, str):
            raise RequestError(400, f"params.label must be a segment name or left out, got {show(label)}")
        label_name = _short(label.strip(), "params.label", _MAX_NAME) if label and label.strip() else None
        target = request.get("target")
        if target is not None and (not isinstance(target, str) or not target.strip()):
            raise RequestError(400, f"params.target must be a non-empty string, got {show(target)}")
        axis = _int(request, "axis", None)
        if axis is not None and axis not in (0, 1, 2):
            raise RequestError(400, f"params.axis must be 0, 1 or 2 (the slice axis of the volume), got {axis}")
        max_steps = _int(request, "max_steps", step_limit)
        if not 1 <= max_steps <= step_limit:
            raise RequestError(
                400, f"params.max_steps={max_steps} is out of range; give 1..{step_limit} (the server's step limit)"
            )
        flags = {}
        for name, default in (("run_agent", run_agent_default), ("auto_repair", False)):
            value = request.get(name, default)
            if not isinstance(value, bool):
                raise RequestError(400, f"params.{name} must be true or false, got {show(value)}")
            flags[name] = value
        foreground, background = _points(request, "foreground"), _points(request, "background")
        if len(foreground) + len(background) > max_clicks:
            raise RequestError(
                400,
                f"params has {len(foreground) + len(background)} foreground/background points; at most {max_clicks} "
                "are accepted in one request (the server's --conf max_clicks)",
            )
        for name, points in (("foreground", foreground), ("background", background)):
            for i, p in enumerate(points):
                if len(p) != 3:
                    raise RequestError(
                        400,
                        f"params.{name}[{i}] = {show(p)} must be an [i, j, k] voxel index: the volume task takes 3D "
                        "points (the 2D task, ibisagent, takes [x, y] pixels)",
                    )
        repair_budget = _int(request, "repair_budget", None)
        if repair_budget is not None and repair_budget < 0:
            raise RequestError(400, f"params.repair_budget must be 0 or more slices, got {repair_budget}")
        session_id = request.get("session_id")
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise RequestError(400, f"params.session_id must be a session id string or null, got {show(session_id)}")
        action = request.get("action")
        if action is not None and action not in ACTIONS:
            raise RequestError(400, f"params.action must be one of {', '.join(ACTIONS)}, got {show(action)}")
        progress_id = request.get("progress_id")
        if progress_id is not None:
            from .progress import ProgressBoard

            ProgressBoard.check_id(progress_id)
        return cls(
            instruction=instruction,
            label_name=label_name,
            label_file=label_file,
            target=_short(target.strip(), "params.target", _MAX_NAME) if target else None,
            axis=axis,
            key_slice=_int(request, "key_slice", None),
            foreground=foreground,
            background=background,
            run_agent=flags["run_agent"],
            max_steps=max_steps,
            first_slice=_int(request, "first_slice", None),
            last_slice=_int(request, "last_slice", None),
            repair_budget=repair_budget,
            auto_repair=flags["auto_repair"],
            session_id=session_id,
            action=action,
            slice=_int(request, "slice", None),
            progress_id=progress_id,
        )

    def points_by_slice(self, axis: int, shape: tuple[int, int, int]) -> dict[int, list[tuple[float, float, bool]]]:
        """{slice: [(x, y, positive), ...]} of all points (foreground first), each checked to lie in the volume."""
        out: dict[int, list[tuple[float, float, bool]]] = {}
        for name, positive in (("foreground", True), ("background", False)):
            for i, p in enumerate(getattr(self, name)):
                if not all(0 <= v < n for v, n in zip(p, shape, strict=True)):
                    raise RequestError(
                        400,
                        f"params.{name}[{i}] = {show(p)} lies outside the volume: [i, j, k] must lie in "
                        f"[0, {shape[0]}) x [0, {shape[1]}) x [0, {shape[2]})",
                    )
                k, x, y = voxel_to_pixel(p, axis)
                out.setdefault(k, []).append((float(x), float(y), positive))
        return out


def check_slice(value: int | None, name: str, n: int, axis: int) -> int | None:
    """`value` within 0..n-1 of the slice axis, else a 400 naming the field and the range."""
    if value is not None and not 0 <= value < n:
        raise RequestError(
            400, f"params.{name}={value} is out of range: the volume has slices 0..{n - 1} along axis {axis}"
        )
    return value


def check_range(first: int, last: int, key: int, n: int, axis: int) -> tuple[int, int]:
    check_slice(first, "first_slice", n, axis)
    check_slice(last, "last_slice", n, axis)
    if first > last:
        raise RequestError(400, f"params.first_slice={first} is after params.last_slice={last}; give first <= last")
    if not first <= key <= last:
        raise RequestError(
            400,
            f"the range first_slice..last_slice = {first}..{last} must hold the key slice {key}; widen the range",
        )
    return first, last
