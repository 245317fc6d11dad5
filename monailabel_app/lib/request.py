"""The ibisagent task's request: its parameters, type-checked and bounded before anything is read or allocated.

`FIELDS` are the parameter names the task reads (the contract in monailabel_app/README.md); the Slicer module's
`IBISAgentLib.request.AgentRequest` writes the same names (tests check both lists agree). Points are [x, y] pixels of
the 2D slice or [i, j, k] voxel indices (`ibisagent.geometry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ibisagent.geometry import voxel_to_pixel
from ibisagent.types import MAX_INSTRUCTION_CHARS, Click

from .errors import RequestError

IMAGE_ID_KEY = "ibisagent_image_id"  # the request's image id, checked against the datastore by the app
UPLOAD_KEY = "ibisagent_label_upload"  # the path of the request's uploaded label, put there by the app's /infer
SESSION_IMAGE_KEY = "ibisagent_session_image"  # (id, path) of an upload session's image, put there by the app
# What a client may send in the request's params ("label": a segment's name, as Slicer's stock module sends it).
FIELDS = (
    "instruction",
    "slice",
    "axis",
    "foreground",
    "background",
    "remove_clicks",
    "max_steps",
    "session_id",
    "undo_to",
    "run_agent",
    "target",
    "label",
)
_MAX_POINTS = 256
# Text that reaches the model's prompt: a megabyte-long instruction kept a tiny model busy for minutes.
_MAX_NAME = 200


@dataclass
class AgentParams:
    """The request's parameters, type-checked. Points stay as given (2 or 3 numbers) until the slice is known.
    `label` arrives as `label_name` (a segment's name, Slicer's stock module) or `label_file` (an upload)."""

    instruction: str | None
    slice: int | None
    axis: int | None
    foreground: list[list[float]]
    background: list[list[float]]
    remove_clicks: list[list[float]]
    max_steps: int
    session_id: str | None
    undo_to: int | None
    run_agent: bool
    target: str | None
    label_name: str | None
    label_file: str | None

    @classmethod
    def parse(cls, request: dict, step_limit: int, max_clicks: int = 64) -> AgentParams:
        label_file = request.get(UPLOAD_KEY)
        request = _Fields(request)
        instruction = request.get("instruction")
        if instruction is not None:
            if not isinstance(instruction, str):
                raise RequestError(400, f"params.instruction must be a string, got {show(instruction)}")
            if not instruction.strip():
                raise RequestError(400, "params.instruction is empty; say what to segment, e.g. 'segment the liver'")
            instruction = _short(instruction.strip(), "params.instruction", MAX_INSTRUCTION_CHARS)
        session_id = request.get("session_id")
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise RequestError(400, f"params.session_id must be a session id string or null, got {show(session_id)}")
        max_steps = _int(request, "max_steps", step_limit)
        if not 1 <= max_steps <= step_limit:
            raise RequestError(
                400, f"params.max_steps={max_steps} is out of range; give 1..{step_limit} (the server's step limit)"
            )
        run_agent = request.get("run_agent", True)
        if not isinstance(run_agent, bool):
            raise RequestError(400, f"params.run_agent must be true or false, got {show(run_agent)}")
        axis = _int(request, "axis", None)
        if axis is not None and axis not in (0, 1, 2):
            raise RequestError(400, f"params.axis must be 0, 1 or 2, got {axis}")
        target = request.get("target")
        if target is not None and (not isinstance(target, str) or not target.strip()):
            raise RequestError(400, f"params.target must be a non-empty string, got {show(target)}")
        # Slicer's stock module sends the segment's name under "label" (an uploaded file arrives under UPLOAD_KEY).
        label = request.get("label")
        if label is not None and not isinstance(label, str):
            raise RequestError(400, f"params.label must be a segment name or left out, got {show(label)}")
        label_name = label.strip() if isinstance(label, str) and label.strip() else None
        if label_name is not None:
            _short(label_name, "params.label", _MAX_NAME)
        foreground, background = _points(request, "foreground"), _points(request, "background")
        remove_clicks = _points(request, "remove_clicks")
        if len(foreground) + len(background) > max_clicks or len(remove_clicks) > max_clicks:
            raise RequestError(
                400,
                f"params has {len(foreground) + len(background)} foreground/background points and "
                f"{len(remove_clicks)} remove_clicks; at most {max_clicks} of each are accepted in one request "
                "(the server's --conf max_clicks)",
            )
        return cls(
            instruction=instruction,
            slice=_int(request, "slice", None),
            axis=axis,
            foreground=foreground,
            background=background,
            remove_clicks=remove_clicks,
            max_steps=max_steps,
            session_id=session_id,
            undo_to=_int(request, "undo_to", None),
            run_agent=run_agent,
            target=_short(target.strip(), "params.target", _MAX_NAME) if target else None,
            label_name=label_name,
            label_file=label_file,
        )

    def points3d(self) -> list[list[float]]:
        return [p for p in (*self.foreground, *self.background) if len(p) == 3]

    def clicks(
        self, target: str, slice_index: int | None, axis: int, shape: tuple[int, int]
    ) -> tuple[list[Click], list[dict]]:
        """The user's foreground (positive) then background (negative) points as Clicks for `target`, and the
        [i, j, k] points that lie on other slices than the request's: left out, as MONAI's deepgrow does (Slicer's
        stock module sends the points of every slice), and listed for the response."""
        out, ignored = [], []
        for name, positive in (("foreground", True), ("background", False)):
            for i, point in enumerate(getattr(self, name)):
                k = voxel_to_pixel(point, axis)[0] if len(point) == 3 else None
                if k is not None and k != (slice_index or 0):
                    ignored.append({"field": name, "index": i, "point": point, "slice": k})
                    continue
                x, y = to_pixel(point, f"params.{name}[{i}]", slice_index, axis, shape)
                out.append(Click(x, y, positive, target))
        return out, ignored


class _Fields(dict):
    """The request, read only through the names in FIELDS (so that FIELDS is the list of what the task reads)."""

    def get(self, name: str, default: Any = None) -> Any:
        if name not in FIELDS:
            raise KeyError(f"{name!r} is not in request.FIELDS")
        return super().get(name, default)


def _int(request: dict, name: str, default: int | None) -> int | None:
    value = request.get(name, default)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"params.{name} must be an integer, got {show(value)}")
    if abs(value) >= 2**31:
        raise RequestError(400, f"params.{name} is out of range: {show(value, 24)} has {len(str(abs(value)))} digits")
    return value


def _points(request: dict, name: str) -> list[list[float]]:
    value = request.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > _MAX_POINTS:
        raise RequestError(400, f"params.{name} must be a list of at most {_MAX_POINTS} points, got {show(value)}")
    for i, p in enumerate(value):
        ok = isinstance(p, list) and len(p) in (2, 3)
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) and _finite(v) for v in p)
        if not ok:
            raise RequestError(
                400, f"params.{name}[{i}] must be [x, y] pixels or [i, j, k] voxel indices, got {show(p)}"
            )
    return [[float(v) for v in p] for p in value]


def to_pixel(
    point: list[float], where: str, slice_index: int | None, axis: int, shape: tuple[int, int]
) -> tuple[float, float]:
    """A request point -> (x, y) pixels of the slice; 3-number points must lie in the request's slice."""
    if len(point) == 3:
        k, x, y = voxel_to_pixel(point, axis)
        if k != (slice_index or 0):
            raise RequestError(
                400,
                f"{where} = {show(point)} lies in slice {k} of axis {axis}, but the request is for slice "
                f"{slice_index or 0}; send only points of that slice",
            )
    else:
        x, y = point
    height, width = shape
    if not (0 <= x < width and 0 <= y < height):
        raise RequestError(
            400,
            f"{where} = {show(point)} lies outside the image: x must be in [0, {width}) and y in [0, {height}) "
            f"(pixels of the {width}x{height} slice)",
        )
    return float(x), float(y)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range: JSON allows 4300 digits
        return False


def _short(text: str, name: str, limit: int) -> str:
    if len(text) > limit:
        raise RequestError(400, f"{name} is {len(text)} characters long; at most {limit} are accepted")
    return text


def show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
