"""The `ibisagent_volume` infer task: maps one MONAI Label request onto the core's volume session
(`ibisagent.volume.VolumeSession`: key slice, propagation, audit, repair) and returns the whole label volume plus a
per-slice summary as the result JSON. The contract is documented in monailabel_app/README.md ("The volume task");
the Slicer module depends on it.

Points are [i, j, k] voxel indices; along axis a the slice is index a and the two other indices in order are the
slice pixel (x, y) (`ibisagent.geometry`). A new session segments the key slice with the points on it (and/or the
agent), propagates both ways within first_slice..last_slice, then applies the points on other slices as the user's
repairs of those slices (nearest the key first, within the repair budget); continuations repair, undo, re-range or
accept one slice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ibisagent.geometry import voxel_to_pixel
from ibisagent.grammar import target_from_instruction
from ibisagent.policies.base import Policy
from ibisagent.session import EditError
from ibisagent.tools.base import SegmentationTool
from ibisagent.types import Click
from ibisagent.volume import VOLUME_VERSION, VolumeSession
from ibisagent.volume.propagation import Propagator, SliceOutput
from ibisagent.volume.session import ANCHORS

from ..errors import RequestError
from ..labels import ImageSource, read_label, read_volume, write_volume_label
from ..progress import NO_PROGRESS, Progress, ProgressBoard
from ..request import IMAGE_ID_KEY
from ..sessions import SessionStore
from ..volume_request import VolumeParams, check_range, check_slice

logger = logging.getLogger(__name__)

SESSION_WAIT_S = 60.0  # how long a request waits for another request on the same session before answering 409
MAX_TRAJECTORY_CHARS = 200_000  # the 2D trajectories of key/repaired slices go into the result up to this size


class _Reporting:
    """The session's propagator seen through a progress counter: every propagated slice ticks the request's
    `Progress` (the core's `VolumeSession.propagate` has no callback; this wrapper stands in for one)."""

    def __init__(self, inner: Propagator):
        self.inner = inner
        self.name = inner.name
        self.progress: Progress = NO_PROGRESS
        self.job_tool: _LeasedTool | None = None  # the running job's 2D tool, given back while a model propagates

    def set_volume(self, slices) -> None:
        self.inner.set_volume(slices)

    def add_anchor(self, index: int, mask: np.ndarray):
        return self.inner.add_anchor(index, mask)

    def remove_anchor(self, index: int) -> None:
        self.inner.remove_anchor(index)

    def propagate(self, start: int, direction: int, stop: int) -> Iterator[SliceOutput]:
        if self.job_tool is not None and _is_model(self.inner):
            self.job_tool.give_back()  # sam2's video predictor does not use the 2D tool: 2D requests may meanwhile
        for out in self.inner.propagate(start, direction, stop):
            self.progress.tick()
            yield out

    def close(self) -> None:
        self.inner.close()


@dataclass
class VolumeEntry:
    """A volume session that follow-up requests continue: the core's session plus what the server keeps."""

    id: str
    image_id: str
    source: ImageSource
    volume: VolumeSession
    propagator: _Reporting
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    ended: bool = False  # expired or evicted while a request held it: that request closes it
    closed: bool = False
    _state: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def close(self) -> None:
        with self._state:
            if self.closed:
                return
            self.closed = True
        self.volume.close()


def _end_entry(entry: VolumeEntry) -> None:
    """The store's on_end: free the session now, or let the request that holds it do so when it is done."""
    if entry.lock.acquire(blocking=False):
        try:
            entry.close()
        finally:
            entry.lock.release()
    else:
        with entry._state:
            entry.ended = True


class IBISAgentVolumeTask(InferTask):
    """Volume task: key slice (user clicks and/or the agent), propagation, audit, repair; sessions continue.

    tools:              lends a 2D tool to a volume request (`sessions.ToolLeases.lease` builds one per
                        concurrent job; `ToolPool.borrow` shares the 2D task's model tools), held while the job
                        works on slices and given back while a model propagates (`_LeasedTool`).
    propagator_factory: the propagator that goes with a tool (`ibisagent.tools.build_propagator`); a model
                        propagator (one with a `predictor`) is built once and its predictor shared by all sessions,
                        each with its own state, one job at a time.
    policy_factory:     returns a new policy over the shared model; None: no model configured.
    max_jobs:           volume requests running at once; one more is answered 503.
    repair_budget:      the default of a request's repair_budget (slices the user or agent may repair).
    """

    def __init__(
        self,
        tools: Callable[[], AbstractContextManager[SegmentationTool]],
        propagator_factory: Callable[[SegmentationTool], Propagator],
        policy_factory: Callable[[], Policy] | None,
        dialect: str,
        max_steps: int,
        session_ttl: float,
        max_sessions: int,
        max_jobs: int,
        repair_budget: int,
        labels: list[str],
        server_info: dict[str, Any],
        max_clicks: int = 64,
        instruction_for: Callable[[str], str] = "segment the {}".format,
        max_pixels: int = 1 << 24,
        max_voxels: int = 1 << 29,
        progress: ProgressBoard | None = None,
        agent_lock: threading.Lock | None = None,
    ):
        super().__init__(
            type=InferType.DEEPGROW,  # Slicer's stock module lists it with the click models and sends 3D points
            labels=labels,
            dimension=3,
            description="IBISAgent volume: the agent or your clicks segment a key slice, the mask is propagated "
            "slice by slice, an audit flags suspicious slices and repairs re-propagate; follow-ups continue",
            config={"max_steps": max_steps, "run_agent": policy_factory is not None},
        )
        self.tools, self.propagator_factory = tools, propagator_factory
        self.policy_factory = policy_factory
        self.dialect, self.max_steps, self.max_clicks = dialect, max_steps, max_clicks
        self.repair_budget = repair_budget
        self.instruction_for = instruction_for
        self.max_pixels, self.max_voxels = max_pixels, max_voxels
        self.server_info = dict(server_info)
        self.max_jobs = max_jobs
        self.sessions = SessionStore(session_ttl, max_sessions, on_end=_end_entry)
        self.progress = progress or ProgressBoard()
        self._jobs = threading.BoundedSemaphore(max_jobs)
        self._tools_lock = threading.Lock()
        self._shared: Any = None  # the first model propagator, whose predictor later sessions share
        self._tool_name: str | None = None  # the tools' name, known after the first job
        self._model_lock = threading.Lock()  # one job at a time on a shared predictor
        self._agent_lock = agent_lock or threading.Lock()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "ibisagent": self.server_info}

    def is_valid(self) -> bool:
        return True

    # -- the request ---------------------------------------------------------------------------------------------
    def __call__(self, request: dict) -> tuple[str, dict]:
        t0 = time.perf_counter()
        params = VolumeParams.parse(request, self.max_steps, self.max_clicks, self.policy_factory is not None)
        uses_agent = params.session_id is None or params.action == "repair" or params.auto_repair
        if params.run_agent and uses_agent and self.policy_factory is None:
            raise RequestError(
                400,
                "no policy model configured; start the server with --conf model <path or hub id>, "
                "or send run_agent false to apply only your clicks",
            )
        image_id = request.get(IMAGE_ID_KEY)
        if not isinstance(image_id, str):
            raise RequestError(400, "the request names no datastore image; give ?image=<id>")
        if params.session_id is None:
            return self._new_session(params, image_id, str(request.get("image", "")), t0)
        entry = self.sessions.get(params.session_id)
        if not entry.lock.acquire(timeout=SESSION_WAIT_S):
            raise RequestError(409, f"session_id {entry.id!r} is busy with another request; retry when it is done")
        try:
            if entry.closed:
                raise RequestError(410, f"session_id {entry.id!r} has ended; start a new session (session_id null)")
            plan = self._check_continuation(entry, params, image_id)
            return self._job(params, t0, lambda job: self._continue(entry, params, plan, job))
        finally:
            with entry._state:
                ended = entry.ended
            if ended:
                entry.close()
            entry.lock.release()

    # -- a new session ---------------------------------------------------------------------------------------------
    def _new_session(self, params: VolumeParams, image_id: str, path: str, t0: float) -> tuple[str, dict]:
        if params.action is not None or params.slice is not None:
            raise RequestError(
                400, "params.action and params.slice continue a session; give the session_id of a previous result"
            )
        source = ImageSource.open(image_id, path, self.max_pixels, self.max_voxels)
        if source.kind != "volume":
            raise RequestError(
                400,
                f"image {image_id!r} is a 2D image, not a 3D volume; the volume task needs a 3D NIfTI (use the "
                "ibisagent task for 2D images)",
            )
        axis = 2 if params.axis is None else params.axis
        n = source.shape[axis]
        points = params.points_by_slice(axis, source.shape)
        instruction = params.instruction
        if instruction is None and params.label_name:
            instruction = self.instruction_for(params.label_name)
        if instruction is None:
            raise RequestError(400, "params.instruction is missing; say what to segment, e.g. 'segment the liver'")
        target = params.target or params.label_name or target_from_instruction(instruction)
        key = params.key_slice
        if key is None:
            if not params.foreground:
                raise RequestError(
                    400,
                    "params.key_slice is missing and there is no foreground point to take it from; give key_slice "
                    f"0..{n - 1} (axis {axis}) or a foreground [i, j, k] point",
                )
            key = voxel_to_pixel(params.foreground[0], axis)[0]  # the slice the point lies in, as for every point
        check_slice(key, "key_slice", n, axis)
        first = 0 if params.first_slice is None else params.first_slice
        last = n - 1 if params.last_slice is None else params.last_slice
        check_range(first, last, key, n, axis)
        shape = source.slice_shape(axis)
        initial = None
        if params.label_file is not None:
            initial = read_label(params.label_file, source, key, axis, shape)
        key_points = points.pop(key, [])
        if not key_points and not params.run_agent and initial is None:
            raise RequestError(
                400,
                f"nothing to do on the key slice {key}: run_agent is false and there are no foreground/background "
                "points on it; click on the key slice or set run_agent true",
            )
        budget = self.repair_budget if params.repair_budget is None else params.repair_budget
        repairs, ignored = [], []
        for s in sorted(points, key=lambda s: (abs(s - key), s)):
            if not first <= s <= last:
                ignored.append({"slice": s, "points": len(points[s]), "reason": f"outside the range {first}..{last}"})
            elif len(repairs) >= budget:
                ignored.append({"slice": s, "points": len(points[s]), "reason": f"beyond the repair budget {budget}"})
            else:
                repairs.append(s)

        def work(job: _Job) -> tuple[str, dict]:
            job.progress.phase("key", slices_total=1)
            volume = read_volume(source)
            propagator = _Reporting(self._new_propagator(job.tool))
            propagator.progress, propagator.job_tool = job.progress, job.tool
            session = VolumeSession(
                job.tool,
                propagator,
                volume,
                instruction,
                target,
                axis=axis,
                dialect=self.dialect,
                repair_budget=budget,
                meta={"image": image_id, "tool": job.tool.name},
            )
            entry = VolumeEntry(SessionStore.new_id(), image_id, source, session, propagator)
            try:
                with self._model(propagator):
                    if initial is not None:
                        session.open_slice(key, initial)
                    changed = set(session.segment_key(key, _clicks(key_points, target), job.policy(key), job.steps))
                    job.progress.tick()
                    job.progress.phase("propagate", slices_total=last - first)
                    changed |= set(session.propagate(first, last))
                    job.progress.phase("repair", slices_total=len(repairs))
                    for s in repairs:
                        changed |= set(session.repair(s, _clicks(points[s], target), None, job.steps))
                        job.progress.tick()
                    changed |= self._audit_and_repair(session, params, job)
            except EditError as exc:
                entry.close()
                raise RequestError(400, f"params: {exc}") from exc
            except BaseException:
                entry.close()
                raise
            self.sessions.add(entry)
            return self._respond(entry, changed, ignored, job, t0)

        return self._job(params, t0, work)

    # -- continuations ---------------------------------------------------------------------------------------------
    def _check_continuation(self, entry: VolumeEntry, params: VolumeParams, image_id: str) -> dict:
        """Everything a continuation needs, checked before the session changes (a refused request leaves it as it
        was). Returns the plan the work follows."""
        session = entry.volume
        axis, n = session.slices.axis, len(session.slices)
        if image_id != entry.image_id:
            raise RequestError(
                400, f"session_id {entry.id!r} works on image {entry.image_id!r}, not {image_id!r}; start a new session"
            )
        if params.axis is not None and params.axis != axis:
            raise RequestError(400, f"session_id {entry.id!r} works on axis {axis}, not params.axis={params.axis}")
        if params.instruction is not None and params.instruction != session.instruction:
            raise RequestError(
                400, f"session_id {entry.id!r} segments {session.instruction!r}; start a new session to change it"
            )
        if params.label_file is not None or params.key_slice is not None or params.repair_budget is not None:
            raise RequestError(
                400, "a label upload, key_slice and repair_budget start a session; send them with session_id null"
            )
        if params.action is None:
            raise RequestError(
                400,
                f"params.action is missing: a continuation of session_id {entry.id!r} needs one of "
                "repair, undo_slice, propagate, accept",
            )
        if session.key is None and params.action != "undo_slice":
            raise RequestError(
                400,
                f"session_id {entry.id!r} has no key slice any more (it was undone): start a new session "
                "(session_id null) with a key slice",
            )
        points = params.points_by_slice(axis, session.slices.volume.shape)
        first, last = session.range
        plan: dict[str, Any] = {"points": []}
        if params.action == "propagate":
            if points or params.slice is not None:
                raise RequestError(400, "action propagate takes first_slice and/or last_slice, not points or slice")
            first = first if params.first_slice is None else params.first_slice
            last = last if params.last_slice is None else params.last_slice
            check_range(first, last, session.key, n, axis)
            outside = [i for i, r in session.records.items() if r.status in ANCHORS and not first <= i <= last]
            if outside:
                raise RequestError(
                    400,
                    f"the range {first}..{last} leaves out slice {outside[0]}, which was "
                    f"{session.records[outside[0]].status}; undo_slice it first or keep it in the range",
                )
            plan["range"] = (first, last)
            return plan
        if params.first_slice is not None or params.last_slice is not None:
            raise RequestError(400, f"first_slice/last_slice go with action propagate, not {params.action}")
        index = params.slice
        if index is None and params.action == "repair" and len(points) == 1:
            index = next(iter(points))
        if index is None:
            raise RequestError(400, f"action {params.action} needs params.slice (0..{n - 1} along axis {axis})")
        check_slice(index, "slice", n, axis)
        plan["slice"] = index
        if params.action == "undo_slice":
            if points:
                raise RequestError(400, "action undo_slice takes a slice, not points")
            return plan  # the core's undo_slice checks the rest before it changes anything
        if params.action == "accept":
            if points:
                raise RequestError(400, "action accept takes a slice, not points")
            if index not in session.records:
                raise RequestError(
                    400, f"params.slice={index} has no segmentation to accept (segmented slices: {_spans(session)})"
                )
            return plan
        # repair
        if set(points) - {index}:
            other = sorted(set(points) - {index})
            raise RequestError(
                400, f"the repair of slice {index} got points on slice(s) {other[:5]}; send points of that slice only"
            )
        if not first <= index <= last:
            raise RequestError(
                400, f"params.slice={index} lies outside the range {first}..{last}; extend it with action propagate"
            )
        if not points.get(index) and not params.run_agent:
            raise RequestError(400, f"nothing to repair on slice {index}: give points on it or set run_agent true")
        budget = session.repair_budget
        if index != session.key and budget is not None and session.repairs_used >= budget:
            raise RequestError(
                400, f"the repair budget of {budget} slice(s) is spent; undo_slice a repair or start a new session"
            )
        plan["points"] = points.get(index, [])
        return plan

    def _continue(self, entry: VolumeEntry, params: VolumeParams, plan: dict, job: _Job) -> tuple[str, dict]:
        session = entry.volume
        session.tool = job.tool
        if hasattr(entry.propagator.inner, "tool"):
            entry.propagator.inner.tool = job.tool  # the weight-free propagator segments with the job's tool
        entry.propagator.progress, entry.propagator.job_tool = job.progress, job.tool
        session.active = None  # a request always commits; an earlier failed one may have left a session open
        with self._model(entry.propagator):
            try:
                if params.action == "propagate":
                    job.progress.phase("propagate", slices_total=plan["range"][1] - plan["range"][0])
                    changed = set(session.propagate(*plan["range"]))
                elif params.action == "undo_slice":
                    job.progress.phase("repair", slices_total=1)
                    changed = set(session.undo_slice(plan["slice"]))
                elif params.action == "accept":
                    job.progress.phase("audit", slices_total=1)
                    session.open_slice(plan["slice"])
                    changed = set(session.commit_slice(plan["slice"])) | {plan["slice"]}  # reviewed, mask kept
                else:
                    job.progress.phase("repair", slices_total=1)
                    s = plan["slice"]
                    clicks = _clicks(plan["points"], session.target)
                    changed = set(session.repair(s, clicks, job.policy(s), job.steps))
                if params.auto_repair:
                    changed |= self._audit_and_repair(session, params, job)
            except EditError as exc:
                raise RequestError(400, f"params: {exc}") from exc
        return self._respond(entry, changed, [], job, job.t0)

    def _audit_and_repair(self, session: VolumeSession, params: VolumeParams, job: _Job) -> set[int]:
        """Audit; with auto_repair and a policy, the agent repairs flagged slices (nearest the key first) while the
        budget lasts. Returns the changed slices."""
        job.progress.phase("audit", slices_total=1)
        candidates = session.audit()
        job.progress.tick()
        changed: set[int] = set()
        if not (params.auto_repair and self.policy_factory is not None):
            return changed
        job.progress.phase("repair", slices_total=len(candidates))
        for _ in range(2 * len(session.slices) + 2):
            budget_left = session.repair_budget is None or session.repairs_used < session.repair_budget
            if not candidates or not budget_left:
                break
            job.agent_slices.append(candidates[0])
            policy = _Serialised(self.policy_factory(), job)
            changed |= set(session.repair(candidates[0], (), policy, job.steps))
            job.progress.tick()
            candidates = session.audit()
        return changed

    # -- jobs: bounded, with a tool and progress -------------------------------------------------------------------
    def _job(self, params: VolumeParams, t0: float, work: Callable[[_Job], tuple[str, dict]]) -> tuple[str, dict]:
        if not self._jobs.acquire(blocking=False):
            raise RequestError(
                503,
                f"the server is busy with {self.max_jobs} volume request(s) (--conf max_volume_jobs); retry in a "
                "moment",
            )
        progress = NO_PROGRESS
        try:
            if params.progress_id is not None:
                progress = self.progress.start(params.progress_id, 0)
            tool = _LeasedTool(self.tools, self._tool_name)
            self._tool_name = tool.name
            try:
                result = work(_Job(self, tool, progress, params, t0))
            finally:
                tool.give_back()
            progress.finish(True)
            return result
        except BaseException:
            progress.finish(False)
            raise
        finally:
            self._jobs.release()

    def _new_propagator(self, tool: SegmentationTool) -> Propagator:
        with self._tools_lock:
            shared = self._shared
        if shared is not None:
            return type(shared)(
                shared.predictor, name=shared.name.removesuffix("-video"), feature_cache=shared.feature_cache
            )
        propagator = self.propagator_factory(tool)
        if _is_model(propagator):
            with self._tools_lock:
                self._shared = self._shared or propagator
        return propagator

    def _model(self, propagator: _Reporting):
        """The lock of a shared predictor (held for the job), or a no-op for the weight-free propagator."""
        return self._model_lock if _is_model(propagator.inner) else _NoLock()

    # -- the response ----------------------------------------------------------------------------------------------
    def _respond(
        self, entry: VolumeEntry, changed: set[int], ignored: list[dict], job: _Job, t0: float
    ) -> tuple[str, dict]:
        session = entry.volume
        record = session.record()
        slices, trajectories, omitted, size = [], {}, [], 0
        for s in record.slices:
            slices.append(
                {
                    "index": s.index,
                    "status": s.status,
                    "source": s.source,
                    "score": round(float(s.score), 4),
                    "flagged": s.flagged,
                    "reasons": list(s.reasons),
                    "reviewed": s.reviewed,
                    "area": int(s.mask.sum()),
                }
            )
            if s.trajectory is not None:
                text = json.dumps(s.trajectory.to_dict())
                if size + len(text) <= MAX_TRAJECTORY_CHARS:
                    trajectories[str(s.index)] = json.loads(text)
                    size += len(text)
                else:
                    omitted.append(s.index)
        header = record.to_dict()
        header.pop("slices", None)
        runs = [session.records.get(i) for i in job.agent_slices]
        agent_runs = [r.trajectory.stop_reason for r in runs if r is not None and r.trajectory is not None]
        result = {
            "session_id": entry.id,
            "image": entry.image_id,
            "axis": session.slices.axis,
            "key_slice": session.key,
            "range": list(session.range),
            "slices": slices,
            "flagged": [s["index"] for s in slices if s["flagged"]],
            "repairs_used": session.repairs_used,
            "repair_budget": session.repair_budget,
            "changed": sorted(int(i) for i in changed),
            "ignored_points": ignored,
            "stop_reason": agent_runs[-1] if agent_runs else "agent_not_run",
            "clicks": record.num_clicks,
            "seconds": round(time.perf_counter() - t0, 3),
            "schema": VOLUME_VERSION,
            "summary": header,
            "trajectories": trajectories,
            "trajectories_omitted": omitted,
            "label_kind": "volume",
        }
        path = write_volume_label(session.label_volume(), entry.source)  # last: nothing fails after the file exists
        logger.info("ibisagent_volume request: %d slices segmented, %.2f s", len(slices), result["seconds"])
        return path, result


class _LeasedTool:
    """The running job's 2D tool, held only while it is used. It is taken from `lease` (the volume task's `tools`)
    on first use and given back while sam2's video predictor propagates (`_Reporting`), so that with a model tool a
    long propagation does not hold the 2D task's slot; used again, it is taken again and given the image it had
    (the slot may have served other images meanwhile). The job runs in one thread; the slot is only taken inside
    the shared predictor's lock (`_model`), never while waiting for it."""

    def __init__(self, lease: Callable[[], AbstractContextManager[SegmentationTool]], name: str | None = None):
        self._lease = lease
        self._held: AbstractContextManager[SegmentationTool] | None = None
        self._tool: SegmentationTool | None = None
        self._image: np.ndarray | None = None
        if name is None:  # the first job: read it, without holding the slot (a job may wait for the predictor next)
            with lease() as tool:
                name = tool.name
        self.name = name

    def _take(self) -> SegmentationTool:
        if self._held is None:
            held = self._lease()
            tool = held.__enter__()
            self._held, self._tool = held, tool
            if self._image is not None:
                tool.set_image(self._image)
        return self._tool

    def give_back(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.__exit__(None, None, None)

    def set_image(self, image: np.ndarray) -> None:
        self._image = None  # taken again for a new image: no need to restore the old one first
        self._take().set_image(image)
        self._image = image

    def reset(self) -> None:
        self._image = None
        if self._held is not None:
            self._tool.reset()

    def __getattr__(self, name: str):  # predict, mask_to_logits, encode_count, ...: on the held tool
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._take(), name)


class _Job:
    """One running volume request: its tool, its progress and the policy runs it made."""

    def __init__(self, task: IBISAgentVolumeTask, tool: _LeasedTool, progress: Progress, params, t0: float):
        self.task, self.tool, self.progress, self.params, self.t0 = task, tool, progress, params, t0
        self.steps = params.max_steps
        self.agent_slices: list[int] = []  # slices the agent ran on, in order (their stop reasons are reported)

    def policy(self, index: int) -> Policy | None:
        """A fresh policy for the agent run on slice `index` when the request asks for the agent, else None."""
        if not self.params.run_agent or self.task.policy_factory is None:
            return None
        self.agent_slices.append(index)
        return _Serialised(self.task.policy_factory(), self)


class _Serialised:
    """A policy whose runs the agent lock serialises (the policies of all sessions share one model)."""

    def __init__(self, policy: Policy, job: _Job):
        self._policy, self._job = policy, job

    def __getattr__(self, name: str):
        return getattr(self._policy, name)

    def act(self, *args, **kwargs):
        with self._job.task._agent_lock:
            return self._policy.act(*args, **kwargs)


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _is_model(propagator: Propagator) -> bool:
    """A model propagator (sam2's video predictor): its own model, shared by the sessions; it does not use the 2D
    tool."""
    return hasattr(propagator, "predictor")


def _clicks(points: list[tuple[float, float, bool]], target: str) -> list[Click]:
    return [Click(x, y, positive, target) for x, y, positive in points]


def _spans(session: VolumeSession) -> str:
    indices = sorted(session.records)
    return f"{indices[0]}..{indices[-1]}" if indices else "none"
