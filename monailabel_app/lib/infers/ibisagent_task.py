"""The `ibisagent` infer task: maps one MONAI Label request onto the core's interactive session
(`ibisagent.session`) and returns the label file plus the trajectory as the result JSON. The request and response contract is documented in
monailabel_app/README.md; the Slicer module depends on it.

Coordinates: a 2-number point is (x, y) pixels of the 2D slice (x = column, y = row); a 3-number point is a voxel
(i, j, k) of the volume, and the slice image of axis a keeps the two other indices in order as (x, y)
(`ibisagent.geometry`: for axis 2, voxel (i, j, k) is pixel x = i, y = j).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ibisagent.grammar import target_from_instruction
from ibisagent.io import ImageReadError, read_image
from ibisagent.policies.base import Policy
from ibisagent.session import Edit, EditError, InteractiveSession
from ibisagent.tools.base import SegmentationTool
from ibisagent.types import Click

from ..errors import RequestError
from ..labels import ImageSource, read_label, write_label
from ..request import IMAGE_ID_KEY, AgentParams, to_pixel
from ..sessions import Session, SessionStore, SliceKey, ToolPool

logger = logging.getLogger(__name__)

SESSION_WAIT_S = 60.0  # how long a request waits for another request on the same session before answering 409


class IBISAgentTask(InferTask):
    """Interactive 2D task: user clicks and/or the agent (policy + tool) segment one slice; sessions continue.

    tool:            the first tool instance (built at start-up, so a bad tool configuration fails there).
    tool_factory:    builds further tool instances when `embedding_cache` > 1.
    policy_factory:  returns a new policy (own conversation, shared model); None: no model configured.
    max_steps:       the step limit: the default and the maximum of a request's `max_steps`.
    max_clicks:      foreground + background points of one request at most.
    max_session_steps: steps of one session at most.
    instruction_for: the instruction for a request that names only a segment (label name -> text).
    max_pixels, max_voxels: the largest 2D image / slice and volume read (checked from the file's header).
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
        max_clicks: int = 64,
        max_session_steps: int = 200,
        instruction_for: Callable[[str], str] = "segment the {}".format,
        max_pixels: int = 1 << 24,
        max_voxels: int = 1 << 29,
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
        self.max_clicks = max_clicks
        self.max_session_steps = max_session_steps
        self.instruction_for = instruction_for
        self.max_pixels, self.max_voxels = max_pixels, max_voxels
        self.server_info = dict(server_info)
        self._agent_lock = threading.Lock()  # the policies of all sessions share one model (and torch's RNG)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "ibisagent": self.server_info}

    def is_valid(self) -> bool:
        return True

    # -- the request ---------------------------------------------------------------------------------------------
    def __call__(self, request: dict) -> tuple[str, dict]:
        t0 = time.perf_counter()
        params = AgentParams.parse(request, self.max_steps, self.max_clicks)
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
            session, clicks, ignored, initial = self._new_session(params, image_id, str(request.get("image", "")))
            return self._run(session, params, t0, clicks=clicks, initial=initial, ignored=ignored)
        session = self.sessions.get(params.session_id)
        if not session.lock.acquire(timeout=SESSION_WAIT_S):
            raise RequestError(409, f"session_id {session.id!r} is busy with another request; retry when it is done")
        try:
            # Everything is checked before the session changes: a refused request leaves it as it was.
            _check_same_slice(session, params, image_id)
            shape = session.image.shape[:2]
            clicks, ignored = params.clicks(session.target, session.key.slice, session.key.axis, shape)
            removed = [
                to_pixel(p, f"params.remove_clicks[{i}]", session.key.slice, session.key.axis, shape)
                for i, p in enumerate(params.remove_clicks)
            ]
            try:
                edit = session.interactive.plan(params.undo_to, removed, clicks)
            except EditError as exc:
                raise RequestError(400, f"params.{exc}") from exc
            return self._run(session, params, t0, edit=edit, ignored=ignored)
        finally:
            session.lock.release()

    def _new_session(self, params: AgentParams, image_id: str, path: str):
        """A session without its interactive session yet (made when the tool is at hand), the user's clicks and the initial
        mask. Nothing is stored: only a request that succeeds stores its session."""
        if params.undo_to is not None or params.remove_clicks:
            raise RequestError(
                400, "undo_to and remove_clicks need a session; give the session_id of a previous result"
            )
        source = ImageSource.open(image_id, path, self.max_pixels, self.max_voxels)
        slice_index, axis = source.resolve_slice(params.slice, params.axis, params.points3d())
        height, width = source.slice_shape(axis)
        instruction = params.instruction
        if instruction is None and params.label_name:  # Slicer's stock module sends only the segment's name
            instruction = self.instruction_for(params.label_name)
        if instruction is None:
            raise RequestError(400, "params.instruction is missing; say what to segment, e.g. 'segment the liver'")
        target = params.target or params.label_name or target_from_instruction(instruction)
        clicks, ignored = params.clicks(target, slice_index, axis, (height, width))
        initial = None
        if params.label_file is not None:
            initial = {target: read_label(params.label_file, source, slice_index, axis, (height, width))}
        elif not clicks and not params.run_agent:
            elsewhere = sorted({p["slice"] for p in ignored})
            detail = (
                f"; the points given lie on other slices: slice {', '.join(map(str, elsewhere[:5]))} of axis {axis}"
            )
            raise RequestError(
                400,
                "nothing to do: run_agent is false and there are no foreground/background points on slice "
                f"{slice_index or 0}{detail if ignored else ''}",
            )
        try:
            image = read_image(source.path, slice_index, axis, max_pixels=self.max_pixels, max_voxels=self.max_voxels)
        except ImageReadError as exc:
            raise RequestError(400, f"image {image_id!r} cannot be read: {exc}") from exc
        key = SliceKey(image_id, slice_index, axis, source.mtime_ns)
        return Session(SessionStore.new_id(), key, image, instruction, target, source=source), clicks, ignored, initial

    def _run(
        self,
        session: Session,
        params: AgentParams,
        t0: float,
        edit: Edit | None = None,
        clicks: list[Click] = (),
        initial: dict[str, np.ndarray] | None = None,
        ignored: list[dict] = (),
    ) -> tuple[str, dict]:
        """Apply the request to the session with a tool that holds its image, then build the response: a checked
        `edit` of a running session, or a new session's user `clicks` and `initial` masks."""
        t_tool = time.perf_counter()
        with self.pool.use(session.key, session.image) as (tool, encoded):
            encode_s = time.perf_counter() - t_tool if encoded else 0.0
            session.encode_count += int(encoded)
            new = session.interactive is None
            if new:
                key = session.key
                session.interactive = InteractiveSession(
                    tool,
                    session.image,
                    session.instruction,
                    session.target,
                    self.dialect,
                    initial_masks=initial,
                    image_is_set=True,
                    meta={"image": key.image_id, "slice": key.slice, "axis": key.axis, "tool": self.tool_name},
                )
            interactive = session.interactive
            interactive.use_tool(tool)
            edit = edit or interactive.plan(clicks=clicks)
            room = self._room(session, edit, params.run_agent)
            interactive.apply(edit)
            if params.run_agent:
                # Each request gets a fresh policy (a new conversation over the shared model): a KV cache kept per
                # session would hold GPU memory (hundreds of MB for a 7B model) for as long as the session lives.
                with self._agent_lock:
                    interactive.run_agent(self.policy_factory(), min(params.max_steps, room))
        if new:
            self.sessions.add(session)
        trajectory = interactive.trajectory
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
            "ignored_points": list(ignored),
        }
        # last: nothing can fail after the file exists
        label_path = write_label(trajectory.final_mask, session.source, session.key.slice, session.key.axis)
        logger.info(  # no session id or instruction: the log is not the place for them
            "ibisagent request: %d steps, stop %s, encoded %s, %.2f s",
            len(trajectory.steps),
            stop_reason,
            encoded,
            time.perf_counter() - t0,
        )
        return label_path, result

    def _room(self, session: Session, edit: Edit, run_agent: bool) -> int:
        """How many more steps the agent may take in the session after `edit` (the session's step limit)."""
        room = self.max_session_steps - edit.keep_steps - bool(edit.clicks)
        if room < 0 or (room == 0 and run_agent):
            raise RequestError(
                400,
                f"session_id {session.id!r} has reached {self.max_session_steps} steps (the server's --conf "
                "max_session_steps): start a new session, or undo_to an earlier step",
            )
        return room


def _check_same_slice(session: Session, params: AgentParams, image_id: str) -> None:
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
