"""The `ibisagent` infer task: maps one MONAI Label request onto the core (Episode, run_episode, Trajectory) and
returns the label file plus the trajectory as the result JSON. The request and response contract is documented in
monailabel_app/README.md; the Slicer module depends on it.

Coordinates: a 2-number point is (x, y) pixels of the 2D slice (x = column, y = row); a 3-number point is a voxel
(i, j, k) of the volume, and the slice image of axis a keeps the two other indices in order as (x, y)
(`ibisagent.geometry`: for axis 2, voxel (i, j, k) is pixel x = i, y = j).
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ibisagent.episode import Episode, EpisodeState
from ibisagent.geometry import put_slice, slice_shape, take_slice, voxel_to_pixel
from ibisagent.grammar import target_from_instruction
from ibisagent.io import NIFTI_SUFFIXES, RASTER_SUFFIXES, ImageReadError, read_image
from ibisagent.loop import run_episode
from ibisagent.policies.base import Policy
from ibisagent.tools.base import SegmentationTool
from ibisagent.trajectory import Step, Trajectory
from ibisagent.types import Action, Click

from ..errors import RequestError
from ..sessions import Session, SessionStore, SliceKey, ToolPool

logger = logging.getLogger(__name__)

IMAGE_ID_KEY = "ibisagent_image_id"  # set by the app (main.py) after it checked the id against the datastore
SESSION_WAIT_S = 60.0  # how long a request waits for another request on the same session before answering 409
# The name tempfile.NamedTemporaryFile gives, which is how MONAI Label's /infer endpoint saves an uploaded label.
_UPLOAD_NAME = re.compile(r"tmp[a-z0-9_]{8}(\.[A-Za-z0-9]+)*")
_MAX_POINTS = 256
# Text that reaches the model's prompt: a megabyte-long instruction kept a tiny model busy for minutes.
_MAX_INSTRUCTION, _MAX_NAME = 2000, 200


class IBISAgentTask(InferTask):
    """Interactive 2D task: user clicks and/or the agent (policy + tool) segment one slice; sessions continue.

    tool:            the first tool instance (built at start-up, so a bad tool configuration fails there).
    tool_factory:    builds further tool instances when `embedding_cache` > 1.
    policy_factory:  returns a new policy (own conversation, shared model); None: no model configured.
    max_steps:       the step limit: the default and the maximum of a request's `max_steps`.
    """

    def __init__(
        self,
        tool: SegmentationTool,
        tool_factory: Callable[[], SegmentationTool],
        policy_factory: Callable[[], Policy] | None,
        dialect: str,
        max_steps: int,
        session_ttl: float,
        max_sessions: int,
        embedding_cache: int,
        labels: list[str],
        server_info: dict[str, Any],
    ):
        super().__init__(
            # "deepgrow" makes Slicer's stock MONAI Label module list the task in its click (DeepGrow) section.
            type=InferType.DEEPGROW,
            labels=labels,
            dimension=2,
            description="IBISAgent: a vision-language policy writes clicks, a segmentation tool turns them into a "
            "mask, on one 2D image or volume slice; follow-up requests continue a session",
            # Slicer sends these back as request parameters; server settings are under info()["ibisagent"].
            config={"max_steps": max_steps, "run_agent": policy_factory is not None},
        )
        self.tool_name = tool.name
        self.pool = ToolPool(tool_factory, embedding_cache, first=tool)
        self.sessions = SessionStore(session_ttl, max_sessions)
        self.policy_factory = policy_factory
        self.dialect = dialect
        self.max_steps = max_steps
        self.server_info = dict(server_info)
        self._agent_lock = threading.Lock()  # the policies of all sessions share one model (and torch's RNG)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "ibisagent": self.server_info}

    def is_valid(self) -> bool:
        return True

    # -- the request ---------------------------------------------------------------------------------------------
    def __call__(self, request: dict) -> tuple[str, dict]:
        t0 = time.perf_counter()
        params = _Params.parse(request, self.max_steps)
        if params.run_agent and self.policy_factory is None:
            raise RequestError(
                400,
                "no policy model configured; start the server with --conf model <path or hub id>, "
                "or send run_agent false to apply only your clicks",
            )
        image_id = request.get(IMAGE_ID_KEY)
        if not isinstance(image_id, str):
            raise RequestError(400, "the request names no datastore image; give ?image=<id>")
        if params.session_id is None:
            session, clicks, initial = self._new_session(params, image_id, str(request.get("image", "")))
            return self._run(session, params, clicks, None, initial, t0)
        session = self.sessions.get(params.session_id)
        if not session.lock.acquire(timeout=SESSION_WAIT_S):
            raise RequestError(409, f"session_id {session.id!r} is busy with another request; retry when it is done")
        try:
            # Everything is checked before the session changes: a refused request leaves it as it was.
            _check_same_slice(session, params, image_id)
            clicks = params.clicks(session.target, session.key.slice, session.key.axis, session.episode.image_size)
            plan = _plan_edits(session, params.undo_to, params.remove_clicks)
            return self._run(session, params, clicks, plan, None, t0)
        finally:
            session.lock.release()

    def _new_session(self, params: _Params, image_id: str, path: str):
        """A session without its episode yet (made when the tool is at hand), the user's clicks and the initial
        mask. Nothing is stored: only a request that succeeds stores its session."""
        if params.undo_to is not None or params.remove_clicks:
            raise RequestError(
                400, "undo_to and remove_clicks need a session; give the session_id of a previous result"
            )
        source = _Source.open(image_id, path)
        slice_index, axis = source.resolve_slice(params.slice, params.axis, params.points3d())
        height, width = source.slice_shape(axis)
        instruction = params.instruction
        if instruction is None and params.label_name:  # Slicer's stock module sends only the segment's name
            instruction = f"segment the {params.label_name}"
        if instruction is None:
            raise RequestError(400, "params.instruction is missing; say what to segment, e.g. 'segment the liver'")
        target = params.target or params.label_name or target_from_instruction(instruction)
        clicks = params.clicks(target, slice_index, axis, (height, width))
        initial = None
        if params.label_file is not None:
            initial = {target: _read_label(params.label_file, source, slice_index, axis, (height, width))}
        elif not clicks and not params.run_agent:
            raise RequestError(400, "nothing to do: run_agent is false and there are no foreground/background points")
        try:
            image = read_image(source.path, slice_index, axis)
        except ImageReadError as exc:
            raise RequestError(400, f"image {image_id!r} cannot be read: {exc}") from exc
        key = SliceKey(image_id, slice_index, axis, source.mtime_ns)
        return Session(SessionStore.new_id(), key, image, instruction, target, source=source), clicks, initial

    def _run(
        self,
        session: Session,
        params: _Params,
        user_clicks: list[Click],
        plan: _EditPlan | None,
        initial: dict[str, np.ndarray] | None,
        t0: float,
    ) -> tuple[str, dict]:
        """Apply the request to the session with a tool that holds its image, then build the response."""
        t_tool = time.perf_counter()
        with self.pool.use(session.key, session.image) as (tool, encoded):
            encode_s = time.perf_counter() - t_tool if encoded else 0.0
            session.encode_count += int(encoded)
            new = session.episode is None
            if new:
                self._begin(session, tool, initial)
            session.episode.tool = tool
            edited = new or bool(user_clicks) or (plan is not None and plan.changed)
            if plan is not None and plan.changed:
                _rewind(session, plan.keep_steps, plan.keep_actions)
                user_clicks = plan.reapply + user_clicks
            if user_clicks:
                _apply_user_step(session, user_clicks)
            trajectory = session.trajectory
            if edited:
                trajectory.answer, trajectory.stop_reason = None, None
            if params.run_agent:
                with self._agent_lock:
                    self._run_agent(session, params.max_steps)
        if new:
            self.sessions.add(session)
        stop_reason = trajectory.stop_reason if params.run_agent else "agent_not_run"
        trajectory.meta["server"] = {
            "request_seconds": time.perf_counter() - t0,
            "encode_seconds": encode_s,
            "tool_encode_count": self.pool.encode_count,
        }
        result = {
            "session_id": session.id,
            "image": session.key.image_id,
            "slice": session.key.slice,
            "axis": session.key.axis,
            "stop_reason": stop_reason,
            "encode_count": session.encode_count,
            "trajectory": trajectory.to_dict(),
            "label_kind": "volume" if session.source.kind == "volume" else "2d",
        }
        label_path = _write_label(trajectory.final_mask, session)  # last: nothing can fail after the file exists
        logger.info(
            "ibisagent session %s: %d steps, stop %s, encoded %s, %.2f s",
            session.id,
            len(trajectory.steps),
            stop_reason,
            encoded,
            time.perf_counter() - t0,
        )
        return label_path, result

    def _begin(self, session: Session, tool: SegmentationTool, initial: dict[str, np.ndarray] | None) -> None:
        episode = Episode(
            tool,
            session.image,
            [session.target],
            initial_masks=initial,
            max_steps=self.max_steps,
            image_is_set=True,
        )
        trajectory = Trajectory(
            session.instruction,
            episode.image_size,
            episode.targets,
            self.dialect,
            initial_masks={t: m for t, m in episode.state.masks.items() if m.any()},
        )
        key = session.key
        trajectory.meta.update(image=key.image_id, slice=key.slice, axis=key.axis, tool=self.tool_name, user_steps=[])
        session.episode, session.trajectory = episode, trajectory

    def _run_agent(self, session: Session, max_steps: int) -> None:
        """Let a policy continue the episode for at most `max_steps` more actions.

        Each request gets a fresh policy (a new conversation over the shared model) that starts from the current
        state: after user clicks or an undo, earlier turns would describe masks that are no longer shown, and a KV
        cache kept per session would hold GPU memory (hundreds of MB for a 7B model) for as long as it lives."""
        policy = self.policy_factory()
        episode, trajectory = session.episode, session.trajectory
        policy.start(session.instruction, episode.targets)
        episode.max_steps = episode.step + max_steps
        first_new = len(trajectory.steps)
        trajectory.answer = None
        run_episode(policy, episode, session.instruction, trajectory=trajectory)
        actions = session.step_actions[-1] if session.step_actions else 0
        for step in trajectory.steps[first_new:]:
            actions += step.action is not None  # run_episode applies exactly the steps that carry an action
            session.step_actions.append(actions)


# -- request parameters ------------------------------------------------------------------------------------------
@dataclass
class _Params:
    """The request's parameters, type-checked. Points stay as given (2 or 3 numbers) until the slice is known."""

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
    def parse(cls, request: dict, step_limit: int) -> _Params:
        instruction = request.get("instruction")
        if instruction is not None:
            if not isinstance(instruction, str):
                raise RequestError(400, f"params.instruction must be a string, got {_show(instruction)}")
            if not instruction.strip():
                raise RequestError(400, "params.instruction is empty; say what to segment, e.g. 'segment the liver'")
            instruction = _short(instruction.strip(), "params.instruction", _MAX_INSTRUCTION)
        session_id = request.get("session_id")
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise RequestError(400, f"params.session_id must be a session id string or null, got {_show(session_id)}")
        max_steps = _int(request, "max_steps", step_limit)
        if not 1 <= max_steps <= step_limit:
            raise RequestError(
                400, f"params.max_steps={max_steps} is out of range; give 1..{step_limit} (the server's step limit)"
            )
        run_agent = request.get("run_agent", True)
        if not isinstance(run_agent, bool):
            raise RequestError(400, f"params.run_agent must be true or false, got {_show(run_agent)}")
        axis = _int(request, "axis", None)
        if axis is not None and axis not in (0, 1, 2):
            raise RequestError(400, f"params.axis must be 0, 1 or 2, got {axis}")
        target = request.get("target")
        if target is not None and (not isinstance(target, str) or not target.strip()):
            raise RequestError(400, f"params.target must be a non-empty string, got {_show(target)}")
        # MONAI Label puts an uploaded label's temporary path under "label"; Slicer's stock module sends the
        # segment's name there. Only a fresh upload in the temp folder is read as a file.
        label = request.get("label")
        if label is not None and not isinstance(label, str):
            raise RequestError(400, f"params.label must be a segment name or left out, got {_show(label)}")
        label_file = label if _is_upload(label) else None
        label_name = label.strip() if isinstance(label, str) and label_file is None and label.strip() else None
        if label_name is not None:
            _short(label_name, "params.label", _MAX_NAME)
        return cls(
            instruction=instruction,
            slice=_int(request, "slice", None),
            axis=axis,
            foreground=_points(request, "foreground"),
            background=_points(request, "background"),
            remove_clicks=_points(request, "remove_clicks"),
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

    def clicks(self, target: str, slice_index: int | None, axis: int, shape: tuple[int, int]) -> list[Click]:
        """The user's foreground (positive) then background (negative) points as Clicks for `target`."""
        out = []
        for name, positive in (("foreground", True), ("background", False)):
            for i, point in enumerate(getattr(self, name)):
                x, y = _to_pixel(point, f"params.{name}[{i}]", slice_index, axis, shape)
                out.append(Click(x, y, positive, target))
        return out


def _int(request: dict, name: str, default: int | None) -> int | None:
    value = request.get(name, default)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"params.{name} must be an integer, got {_show(value)}")
    return value


def _points(request: dict, name: str) -> list[list[float]]:
    value = request.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > _MAX_POINTS:
        raise RequestError(400, f"params.{name} must be a list of at most {_MAX_POINTS} points, got {_show(value)}")
    for i, p in enumerate(value):
        ok = isinstance(p, list) and len(p) in (2, 3)
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) and _finite(v) for v in p)
        if not ok:
            raise RequestError(
                400, f"params.{name}[{i}] must be [x, y] pixels or [i, j, k] voxel indices, got {_show(p)}"
            )
    return [[float(v) for v in p] for p in value]


def _to_pixel(
    point: list[float], where: str, slice_index: int | None, axis: int, shape: tuple[int, int]
) -> tuple[float, float]:
    """A request point -> (x, y) pixels of the slice; 3-number points must lie in the request's slice."""
    if len(point) == 3:
        k, x, y = voxel_to_pixel(point, axis)
        if k != (slice_index or 0):
            raise RequestError(
                400,
                f"{where} = {_show(point)} lies in slice {k} of axis {axis}, but the request is for slice "
                f"{slice_index or 0}; send only points of that slice",
            )
    else:
        x, y = point
    height, width = shape
    if not (0 <= x < width and 0 <= y < height):
        raise RequestError(
            400,
            f"{where} = {_show(point)} lies outside the image: x must be in [0, {width}) and y in [0, {height}) "
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


def _is_upload(value: Any) -> bool:
    """True for a file MONAI Label's /infer endpoint saved from an upload (a fresh temp file), never for a path a
    client wrote into params."""
    if not isinstance(value, str) or not _UPLOAD_NAME.fullmatch(os.path.basename(value)):
        return False
    real = os.path.realpath(value)
    return os.path.dirname(real) == os.path.realpath(tempfile.gettempdir()) and os.path.isfile(real)


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- images, slices and label files -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    """A datastore image: `kind` "2d" (PNG/JPG/TIFF/BMP, one DICOM file, a 2D NIfTI) or "volume" (3D NIfTI);
    `shape` the voxel shape of a volume, (H, W) of a 2D image."""

    image_id: str
    path: str
    kind: str
    shape: tuple[int, ...]
    mtime_ns: int
    nifti: bool

    @classmethod
    def open(cls, image_id: str, path: str) -> _Source:
        p = Path(path)
        if p.is_dir():
            raise RequestError(
                400,
                f"image {image_id!r} is a DICOM series folder; this task reads NIfTI volumes (MONAI Label converts "
                "DICOMweb series with MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=true), PNG/JPG/TIFF and single DICOM files",
            )
        if not p.is_file():
            raise RequestError(404, f"image {image_id!r} has no file in the datastore")
        name, mtime = p.name.lower(), p.stat().st_mtime_ns
        try:
            if name.endswith(NIFTI_SUFFIXES):
                import nibabel as nib

                shape = tuple(int(s) for s in nib.load(str(p)).shape)
                if len(shape) == 4 and shape[3] == 1:
                    shape = shape[:3]
                if len(shape) == 2:
                    return cls(image_id, str(p), "2d", (shape[1], shape[0]), mtime, True)
                if len(shape) != 3:
                    raise RequestError(400, f"image {image_id!r} is a NIfTI of shape {shape}; expected 2D or 3D")
                return cls(image_id, str(p), "volume", shape, mtime, True)
            if name.endswith(RASTER_SUFFIXES):
                from PIL import Image

                with Image.open(p) as im:
                    return cls(image_id, str(p), "2d", (im.height, im.width), mtime, False)
            if name.endswith((".dcm", ".dicom")):
                return cls(image_id, str(p), "2d", read_image(p).shape[:2], mtime, False)
        except RequestError:
            raise
        except Exception as exc:  # corrupt files: nibabel and PIL raise many types
            raise RequestError(400, f"image {image_id!r} cannot be read: {type(exc).__name__}: {exc}") from exc
        raise RequestError(
            400, f"image {image_id!r} ({p.suffix}) is not supported; use PNG/JPG/TIFF, NIfTI or a DICOM file"
        )

    def resolve_slice(self, slice_index: int | None, axis: int | None, points3d: list[list[float]]):
        """(slice, axis) of the request: (None, 2) for a 2D image; for a volume the given slice, else the slice all
        3-number points lie in, else 0 when the volume has one slice along the axis."""
        if self.kind == "2d":
            if slice_index not in (None, 0):
                raise RequestError(
                    400, f"params.slice={slice_index} is out of range: image {self.image_id!r} is 2D; give slice null"
                )
            return None, 2
        axis = 2 if axis is None else axis
        n = self.shape[axis]
        if slice_index is None:
            ks = {voxel_to_pixel(p, axis)[0] for p in points3d} or ({0} if n == 1 else set())
            if len(ks) != 1:
                detail = "its points lie in several slices" if ks else "it has no [i, j, k] points"
                raise RequestError(
                    400,
                    f"params.slice is missing and {detail}; image {self.image_id!r} is a volume of shape "
                    f"{list(self.shape)}: give slice 0..{n - 1} (axis {axis})",
                )
            slice_index = ks.pop()
        if not 0 <= slice_index < n:
            raise RequestError(
                400,
                f"params.slice={slice_index} is out of range: image {self.image_id!r} has slices 0..{n - 1} "
                f"along axis {axis} (shape {list(self.shape)})",
            )
        return slice_index, axis

    def slice_shape(self, axis: int) -> tuple[int, int]:
        """(H, W) of the 2D image a request works on."""
        if self.kind == "2d":
            return self.shape[0], self.shape[1]
        return slice_shape(self.shape, axis)


def _read_label(path: str, source: _Source, slice_index: int | None, axis: int, shape: tuple[int, int]) -> np.ndarray:
    """An uploaded initial mask -> HxW bool: a PNG/JPG of the slice's size (foreground = first channel > 0), or a
    NIfTI of the volume's shape (the request's slice is taken), or for a 2D image a NIfTI of shape (W, H[, 1])."""
    name = path.lower()
    height, width = shape
    try:
        if name.endswith(RASTER_SUFFIXES):
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
            mask = (arr[..., 0] if arr.ndim == 3 else arr) > 0
            if mask.shape != shape:
                raise RequestError(
                    400,
                    f"the label upload is a {mask.shape[1]}x{mask.shape[0]} image but the slice is {width}x{height} "
                    "(width x height); send a mask of the slice's size",
                )
            return mask
        if name.endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            arr = np.asanyarray(nib.load(path).dataobj)
            if arr.ndim == 4 and arr.shape[3] == 1:
                arr = arr[..., 0]
            if source.kind == "volume":
                if arr.shape != source.shape:
                    raise RequestError(
                        400,
                        f"the label upload has shape {list(arr.shape)} but image {source.image_id!r} has shape "
                        f"{list(source.shape)}; send a label volume of the image's shape",
                    )
                return take_slice(arr, slice_index, axis) > 0
            if arr.ndim == 3 and arr.shape[2] == 1:  # Slicer stores a 2D labelmap as one slice
                arr = arr[..., 0]
            if arr.shape != (width, height):
                raise RequestError(
                    400,
                    f"the label upload has shape {list(arr.shape)} but the {width}x{height} image needs a NIfTI of "
                    f"shape [{width}, {height}] (i = column, j = row)",
                )
            return arr.T > 0
    except RequestError:
        raise
    except Exception as exc:
        detail = str(exc).replace(path, "the upload")  # the server's temp path means nothing to the client
        raise RequestError(400, f"the label upload cannot be read: {type(exc).__name__}: {detail}") from exc
    raise RequestError(400, "the label upload must be a PNG/JPG mask or a NIfTI (.nii, .nii.gz) label")


def _write_label(mask: np.ndarray, session: Session) -> str:
    """The final mask as a temporary file MONAI Label sends and then deletes: uint8, 1 = foreground. 2D images give
    a PNG (a NIfTI for a NIfTI image); volumes a NIfTI of the volume's shape, the mask in the session's slice."""
    source, key = session.source, session.key
    mask = np.asarray(mask, np.uint8)
    if not source.nifti:
        from PIL import Image

        with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
            Image.fromarray(mask).save(f, format="PNG")
            return f.name
    import nibabel as nib

    ref = nib.load(source.path)
    if source.kind == "volume":
        data = np.zeros(source.shape, np.uint8)
        put_slice(data, key.slice, key.axis, mask)
    else:
        data = np.ascontiguousarray(mask.T)
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(data.shape)
    image = nib.Nifti1Image(data, ref.affine, header)
    image.header.set_slope_inter(1, 0)
    with tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False) as f:
        path = f.name
    nib.save(image, path)
    return path


# -- session edits -------------------------------------------------------------------------------------------------
def _check_same_slice(session: Session, params: _Params, image_id: str) -> None:
    key = session.key
    if image_id != key.image_id:
        raise RequestError(
            400, f"session_id {session.id!r} works on image {key.image_id!r}, not {image_id!r}; start a new session"
        )
    if params.slice is not None and params.slice != (key.slice or 0):
        raise RequestError(
            400, f"session_id {session.id!r} works on slice {key.slice}, not params.slice={params.slice}"
        )
    if key.slice is not None and params.axis is not None and params.axis != key.axis:
        raise RequestError(400, f"session_id {session.id!r} works on axis {key.axis}, not params.axis={params.axis}")
    if params.instruction is not None and params.instruction != session.instruction:
        raise RequestError(
            400,
            f"session_id {session.id!r} segments {session.instruction!r}; to change the instruction start a new "
            "session",
        )
    if params.label_file is not None:
        raise RequestError(400, "a label upload starts a refinement; send it with session_id null")


@dataclass
class _EditPlan:
    changed: bool = False
    keep_steps: int = 0  # trajectory steps to keep
    keep_actions: int = 0  # episode actions to keep (Episode.undo_to)
    reapply: list[Click] | None = None


def _plan_edits(session: Session, undo_to: int | None, remove: list[list[float]]) -> _EditPlan:
    """Check undo_to and remove_clicks against the session and work out the rewind, without changing anything.

    undo_to k keeps the first k trajectory steps (0: back to the initial state). Removing clicks rewinds to the
    state before the earliest removed click appeared and re-applies the later clicks that are kept, as one user step.
    """
    n_steps = len(session.trajectory.steps)
    plan = _EditPlan(keep_steps=n_steps, keep_actions=session.episode.step, reapply=[])
    if undo_to is not None:
        if not 0 <= undo_to <= n_steps:
            raise RequestError(
                400, f"params.undo_to={undo_to} is out of range; session_id {session.id!r} has steps 0..{n_steps}"
            )
        plan.changed = undo_to < n_steps
        plan.keep_steps = undo_to
        plan.keep_actions = session.step_actions[undo_to - 1] if undo_to else 0
    if not remove:
        return plan
    history = session.episode.history[: plan.keep_actions + 1]
    current = history[-1].clicks
    height, width = session.episode.image_size
    removed: set[tuple[str, int, int]] = set()
    first_needed = len(history) - 1
    for i, point in enumerate(remove):
        x, y = _to_pixel(point, f"params.remove_clicks[{i}]", session.key.slice, session.key.axis, (height, width))
        px = (int(x), int(y))
        hits = [(t, *px) for t, cs in current.items() if any((int(c.x), int(c.y)) == px for c in cs)]
        if not hits:
            shown = ", ".join(f"({int(c.x)}, {int(c.y)})" for cs in current.values() for c in cs) or "none"
            raise RequestError(
                400, f"params.remove_clicks[{i}] = {_show(point)}: no click at pixel {px}; current clicks: {shown}"
            )
        for hit in hits:
            removed.add(hit)
            first_needed = min(first_needed, _appeared_at(history, hit) - 1)
    kept = {t: [c for c in cs if (t, int(c.x), int(c.y)) not in removed] for t, cs in current.items()}
    base = history[first_needed].clicks
    if any(list(base.get(t, ())) != kept[t][: len(base.get(t, ()))] for t in kept):
        first_needed = 0  # the model undid and redid steps in between: rebuild from the initial state
        base = history[0].clicks
    plan.changed = True
    plan.keep_actions = first_needed
    plan.keep_steps = bisect.bisect_right(session.step_actions, first_needed)
    plan.reapply = [c for t, cs in kept.items() for c in cs[len(base.get(t, ())) :]]
    return plan


def _appeared_at(history: list[EpisodeState], hit: tuple[str, int, int]) -> int:
    """The index of the first state from which on the click (target, x, y) is present in every later state."""
    target, x, y = hit
    index = len(history) - 1
    while index > 0 and any((int(c.x), int(c.y)) == (x, y) for c in history[index - 1].clicks.get(target, ())):
        index -= 1
    return index


def _rewind(session: Session, keep_steps: int, keep_actions: int) -> None:
    session.episode.undo_to(keep_actions)
    del session.trajectory.steps[keep_steps:]
    del session.step_actions[keep_steps:]
    meta = session.trajectory.meta
    meta["user_steps"] = [i for i in meta.get("user_steps", []) if i < keep_steps]


def _apply_user_step(session: Session, clicks: list[Click]) -> None:
    """The user's clicks as one step of the episode and the trajectory (listed in meta["user_steps"])."""
    episode, trajectory = session.episode, session.trajectory
    action = Action(clicks=tuple(clicks))
    t0 = time.perf_counter()
    state = episode.apply(action)
    step = Step(
        index=len(trajectory.steps),
        text="",
        action=action,
        clicks={t: list(cs) for t, cs in state.clicks.items()},
        masks=dict(state.masks),
        scores=dict(state.scores),
        timings={"tool": time.perf_counter() - t0},
    )
    trajectory.steps.append(step)
    session.step_actions.append(episode.step)
    trajectory.meta.setdefault("user_steps", []).append(step.index)
