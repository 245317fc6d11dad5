"""A volume session: the agent (or the user, or both) segments a key slice, the mask is propagated slice by slice
in both directions until the object ends, an audit flags suspicious slices, and the agent's click loop repairs them,
each repair re-propagating outward from the repaired slice only.

Every 2D step is today's interactive session (`ibisagent.session.InteractiveSession`) on one slice: `open_slice`
starts one (with the slice's current mask as its initial mask), its clicks, undo and agent runs are the 2D ones,
and `commit_slice` makes its mask the slice's mask (the key, or a repair). A MONAI Label task or a Slicer module
maps requests onto these methods, as the 2D task maps onto `InteractiveSession`. `run_volume` is the whole pipeline
for one policy (the CLI's evaluation and the benchmarks).

Slices are `ibisagent.geometry` slices of an (I, J, K) volume along `axis`; masks are HxW bool in slice pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ibisagent.policies.base import Policy
from ibisagent.session import EditError, InteractiveSession
from ibisagent.tools.base import SegmentationTool
from ibisagent.types import Click
from ibisagent.volume.audit import AuditSpec, flag_reasons, slice_signals
from ibisagent.volume.propagation import Propagator
from ibisagent.volume.record import SliceRecord, VolumeRecord
from ibisagent.volume.slices import SliceStack

ANCHORS = ("key", "repaired")


@dataclass
class _Change:
    """One committed change, for `undo_slice`: the slice it was about and every slice's record before it."""

    index: int
    kind: str  # "key" | "repair" | "propagate"
    before: dict[int, SliceRecord | None]
    key_before: int | None


class VolumeSession:
    """One volume, one instruction, one target.

    tool:          the 2D segmentation tool of key and repaired slices (the click loop).
    propagator:    carries masks between slices (`ibisagent.volume.propagation`); it gets the volume here.
    volume:        (I, J, K) array; `axis` the slice axis; `window` as in `SliceStack`.
    repair_budget: how many slices may be repaired (None: no limit); the key slice is not a repair.
    stop_after:    propagation ends after this many consecutive slices without the object (empty mask, or an
                   object score below `absent_score`); 2 tolerates one dropped slice inside the object.
    audit:         the audit's thresholds.

    Read `records` ({slice index: SliceRecord}), `key` and `range`; change them only through the methods. Call
    `close` at the end: it frees the propagator's state.
    """

    def __init__(
        self,
        tool: SegmentationTool,
        propagator: Propagator,
        volume: np.ndarray,
        instruction: str,
        target: str = "target",
        axis: int = 2,
        window: tuple[float, float] | None = None,
        dialect: str = "ibis",
        repair_budget: int | None = None,
        stop_after: int = 2,
        absent_score: float = 0.3,
        audit: AuditSpec | None = None,
        meta: dict | None = None,
    ):
        if stop_after < 1:
            raise ValueError(f"stop_after must be at least 1, got {stop_after}")
        if repair_budget is not None and repair_budget < 0:
            raise ValueError(f"repair_budget must be >= 0 or None, got {repair_budget}")
        self.tool, self.propagator = tool, propagator
        self.slices = SliceStack(volume, axis, window)
        self.instruction, self.target, self.dialect = instruction, target, dialect
        self.repair_budget, self.stop_after, self.absent_score = repair_budget, stop_after, absent_score
        self.audit_spec = audit or AuditSpec()
        self.meta = dict(meta or {})
        self.records: dict[int, SliceRecord] = {}
        self.key: int | None = None
        self.range: tuple[int, int] = (0, len(self.slices) - 1)
        self.repairs_used = 0
        self.active: tuple[int, InteractiveSession] | None = None
        self._log: list[_Change] = []
        self.propagator.set_volume(self.slices)

    # -- 2D sessions on slices -------------------------------------------------------------------------------------
    def open_slice(self, index: int, initial_mask: np.ndarray | None = None) -> InteractiveSession:
        """The interactive 2D session on slice `index`, started with the slice's current mask as its initial mask, or
        with `initial_mask` (HxW, slice pixels: e.g. a label the user uploaded for the key slice; it replaces an open
        session on that slice). An open session on another slice is discarded. Click, undo or run the agent on it,
        then `commit_slice`."""
        index = self.slices.check_index(index)
        if initial_mask is None:
            if self.active is not None and self.active[0] == index:
                return self.active[1]
            record = self.records.get(index)
            initial_mask = record.mask if record is not None else None
            meta = {"slice": index, "axis": self.slices.axis}
        else:
            initial_mask = np.asarray(initial_mask, bool)
            if initial_mask.shape != self.slices.shape:
                raise ValueError(
                    f"open_slice({index}): the initial mask is {initial_mask.shape[::-1]} (W x H) but the slices are "
                    f"{self.slices.shape[::-1]}; give a mask of the slice's size"
                )
            meta = {"slice": index, "axis": self.slices.axis, "initial": "user"}
        initial = {self.target: initial_mask} if initial_mask is not None and initial_mask.any() else None
        session = InteractiveSession(
            self.tool,
            self.slices.image(index),
            self.instruction,
            self.target,
            self.dialect,
            initial_masks=initial,
            meta=meta,
        )
        self.active = (index, session)
        return session

    def commit_slice(self, index: int) -> list[int]:
        """Make the open session's mask slice `index`'s mask: the key slice if there is none yet, else a repair that
        re-propagates outward from it (away from the key; both ways for the key itself). A session that changed
        nothing marks the slice reviewed instead (no repair spent). Returns the slices whose records changed."""
        if self.active is None or self.active[0] != index:
            raise EditError(f"commit_slice({index}): no session is open on slice {index}; call open_slice first")
        session = self.active[1]
        mask = session.episode.union_mask()
        record = self.records.get(index)
        clicked = any(s.action is not None and s.action.clicks for s in session.trajectory.steps)
        current = record.mask if record is not None else np.zeros(mask.shape, bool)
        if self.key is not None and not clicked and np.array_equal(mask, current):
            self.active = None  # looked at and left as it is: reviewed, no repair spent
            if record is not None:
                self.records[index] = replace(record, reviewed=True, flagged=False, trajectory=session.trajectory)
            return []
        is_repair = self.key is not None and index != self.key
        if is_repair and self.repair_budget is not None and self.repairs_used >= self.repair_budget:
            raise EditError(f"commit_slice({index}): the repair budget of {self.repair_budget} slice(s) is spent")
        change = _Change(index, "repair" if is_repair else "key", {index: record}, self.key)
        status = "repaired" if is_repair else "key"
        self.records[index] = SliceRecord(index, status, _source(session), mask, 1.0, trajectory=session.trajectory)
        self.propagator.add_anchor(index, mask)
        if is_repair:
            self.repairs_used += 1
        try:
            if is_repair:
                self._run(index, 1 if index > self.key else -1, change.before)
            elif self.key is not None:  # the key slice segmented again: everything follows it
                for direction in (1, -1):
                    self._run(index, direction, change.before)
        except BaseException:  # re-propagation failed part way: the volume as before, the slice's session kept open
            self._revert(change)
            raise
        self.active = None
        if not is_repair:
            self.key = index
        self._log.append(change)
        return sorted(change.before)

    # -- propagation -----------------------------------------------------------------------------------------------
    def propagate(
        self, first: int | None = None, last: int | None = None, on_slice: Callable[[int], None] | None = None
    ) -> list[int]:
        """Propagate from the key slice both ways until the object ends, within slices `first`..`last` (default:
        the whole volume). A range change drops propagated slices outside it and extends from the outermost anchor
        on each side. `on_slice(index)` is called after each propagated slice (progress). Returns the slices whose
        records changed."""
        if self.key is None:
            raise EditError("propagate: no key slice yet; open_slice(k), segment it, then commit_slice(k)")
        first = self.range[0] if first is None else self.slices.check_index(first, "first")
        last = self.range[1] if last is None else self.slices.check_index(last, "last")
        if not first <= self.key <= last:
            raise EditError(f"propagate: the range {first}..{last} must hold the key slice {self.key}")
        outside = sorted(i for i in self.records if not first <= i <= last)
        for i in outside:  # every check before the first change: a refused range changes nothing
            if self.records[i].status in ANCHORS:
                raise EditError(f"propagate: slice {i} was {self.records[i].status} and lies outside {first}..{last}")
        before: dict[int, SliceRecord | None] = {i: self.records.pop(i) for i in outside}
        old_range, self.range = self.range, (first, last)
        anchors = [i for i, r in self.records.items() if r.status in ANCHORS]
        change = _Change(self.key, "propagate", before, self.key)
        try:
            self._run(max(anchors), 1, before, on_slice)
            self._run(min(anchors), -1, before, on_slice)
        except BaseException:  # the tool failed (or the caller stopped it) part way: back to the state before
            self._revert(change)
            self.range = old_range
            raise
        self._log.append(change)
        return sorted(before)

    def _run(
        self,
        start: int,
        direction: int,
        before: dict[int, SliceRecord | None],
        on_slice: Callable[[int], None] | None = None,
    ) -> None:
        """Propagate from the anchor `start` in `direction` until the object ends, the range ends or another anchor
        comes; slices left over from an earlier propagation beyond the new end are dropped."""
        stop = self.range[1] if direction > 0 else self.range[0]
        index, misses = start, 0
        if start != stop:
            for out in self.propagator.propagate(start, direction, stop):
                index = out.index
                record = self.records.get(index)
                if record is not None and record.status in ANCHORS:
                    return  # the next anchor: beyond it, slices follow that anchor
                before.setdefault(index, record)
                absent = not out.mask.any() or out.score < self.absent_score
                misses = misses + 1 if absent else 0
                mask = np.zeros(out.mask.shape, bool) if absent else out.mask
                status = "absent" if absent else "propagated"
                self.records[index] = SliceRecord(index, status, "propagation", mask, float(out.score))
                if on_slice is not None:
                    on_slice(index)
                if misses >= self.stop_after:
                    break
        for j in range(index + direction, stop + direction, direction):
            record = self.records.get(j)
            if record is None:
                continue
            if record.status in ANCHORS:
                break
            before.setdefault(j, self.records.pop(j))

    # -- audit and repair ------------------------------------------------------------------------------------------
    def audit(self) -> list[int]:
        """Compute every slice's signals, flag the suspicious ones (`ibisagent.volume.audit`) and return the flagged
        slices that are neither anchors nor reviewed, nearest to the key first."""
        masks = {i: r.mask for i, r in self.records.items()}
        checked = [i for i, r in self.records.items() if r.status in ANCHORS or r.reviewed]
        flagged = []
        for i, record in self.records.items():
            prev, nxt = masks.get(i - 1), masks.get(i + 1)
            distance = min((abs(i - j) for j in checked), default=None)
            record.signals = slice_signals(record.mask, record.score, prev, nxt, distance)
            areas = [None if m is None else int(m.sum()) for m in (prev, nxt)]
            reasons = [] if record.status in ANCHORS else flag_reasons(record.signals, self.audit_spec, *areas)
            if record.status == "absent" and prev is None and nxt is None:
                reasons = []
            record.reasons, record.flagged = reasons, bool(reasons) and not record.reviewed
            if record.flagged:
                flagged.append(i)
        return sorted(flagged, key=lambda i: (abs(i - (self.key or 0)), i))

    def segment_key(
        self, index: int, clicks: Sequence[Click] = (), policy: Policy | None = None, max_actions: int = 20
    ) -> list[int]:
        """Segment slice `index` with the user's `clicks` (one step) and/or `policy` (up to `max_actions`), commit it
        as the key slice (or re-segment the key) and return the changed slices. Call `propagate` next."""
        self._click_and_act(index, clicks, policy, max_actions)
        return self.commit_slice(index)

    def repair(
        self, index: int, clicks: Sequence[Click] = (), policy: Policy | None = None, max_actions: int = 10
    ) -> list[int]:
        """Repair slice `index`: its propagated mask is the initial mask of a 2D session, the user's `clicks` and/or
        `policy` correct it (a policy that stops without clicking accepts the slice: it is marked reviewed), then
        propagation re-runs outward from it. Returns the changed slices."""
        if self.key is None:
            raise EditError(f"repair({index}): no key slice yet; segment one first")
        self._click_and_act(index, clicks, policy, max_actions)
        return self.commit_slice(index)

    def _click_and_act(self, index: int, clicks: Sequence[Click], policy: Policy | None, max_actions: int) -> None:
        session = self.open_slice(index)
        if clicks:
            session.add_clicks(clicks)
        if policy is not None:
            session.run_agent(policy, max_actions)

    def undo_slice(self, index: int) -> list[int]:
        """Undo the latest change made from slice `index` (its repair with the re-propagation it caused, a
        propagation from the key, or the key itself). A later change that rewrote any of the same slices must be
        undone first (EditError names it). Returns the slices whose records changed back."""
        position = next((n for n in range(len(self._log) - 1, -1, -1) if self._log[n].index == index), None)
        if position is None:
            raise EditError(f"undo_slice({index}): slice {index} has no change to undo")
        change = self._log[position]
        for later in self._log[position + 1 :]:
            if set(later.before) & set(change.before):
                raise EditError(
                    f"undo_slice({index}): the later {later.kind} of slice {later.index} rewrote some of the same "
                    f"slices; undo slice {later.index} first"
                )
        del self._log[position]
        if self.active is not None and self.active[0] in change.before:
            self.active = None
        self._revert(change)
        return sorted(change.before)

    def _revert(self, change: _Change) -> None:
        """Put back the records, anchors, repair count and key slice as they were before `change`."""
        for j, record in change.before.items():
            if record is None:
                self.records.pop(j, None)
            else:
                self.records[j] = record
        if change.kind != "propagate":
            self.propagator.remove_anchor(change.index)
            previous = change.before.get(change.index)
            if previous is not None and previous.status in ANCHORS:
                self.propagator.add_anchor(change.index, previous.mask)
        if change.kind == "repair":
            self.repairs_used -= 1
        self.key = change.key_before

    # -- results ---------------------------------------------------------------------------------------------------
    def label_volume(self) -> np.ndarray:
        """The (I, J, K) bool label of the session (the volume's voxel grid)."""
        return self.record().label_volume()

    def record(self) -> VolumeRecord:
        """The session's serialisable record (`ibisagent.volume.record`)."""
        return VolumeRecord(
            instruction=self.instruction,
            target=self.target,
            volume_shape=tuple(int(s) for s in self.slices.volume.shape),
            axis=self.slices.axis,
            slice_size=self.slices.shape,
            dialect=self.dialect,
            key_slice=self.key,
            range=self.range,
            repair_budget=self.repair_budget,
            repairs_used=self.repairs_used,
            tool=getattr(self.tool, "name", type(self.tool).__name__),
            propagator=getattr(self.propagator, "name", type(self.propagator).__name__),
            slices=[self.records[i] for i in sorted(self.records)],
            meta=dict(self.meta),
        )

    def close(self) -> None:
        """End the session: free the propagator's state (a sam2 predictor state, cached features)."""
        self.active = None
        self.propagator.close()


def _source(session: InteractiveSession) -> str:
    """Who changed the slice: "user", "agent" or "agent+user" (from the trajectory's user steps; a mask the user gave
    as the initial mask counts as the user's)."""
    meta = session.trajectory.meta
    user = set(meta.get("user_steps", []))
    acted = [s.index for s in session.trajectory.steps if s.action is not None and s.action.clicks]
    who = {"user" if i in user else "agent" for i in acted}
    if meta.get("initial") == "user":
        who.add("user")
    return "+".join(sorted(who)) or "agent"


def run_volume(
    session: VolumeSession,
    key_slice: int,
    key_policy: Policy | None,
    repair_policy: Callable[[int], Policy] | None = None,
    *,
    key_clicks: Sequence[Click] = (),
    max_actions: int = 20,
    select: Callable[[VolumeSession], list[int]] | None = None,
    first: int | None = None,
    last: int | None = None,
    on_slice: Callable[[int], None] | None = None,
) -> VolumeRecord:
    """The whole pipeline: the key slice (clicks and/or a policy), propagation, then while the repair budget lasts
    the audit's flagged slices (or `select(session)`'s, nearest the key first) are repaired by `repair_policy(i)`.
    `on_slice(index)` is called after each slice the first propagation carries (progress). Returns the record; the
    session stays open (close it)."""
    session.segment_key(key_slice, key_clicks, key_policy, max_actions)
    session.propagate(first, last, on_slice)
    if repair_policy is None:
        session.audit()
        return session.record()
    for _ in range(4 * len(session.slices) + 4):  # every round repairs or reviews a slice; this bounds a loop
        candidates = select(session) if select is not None else session.audit()
        budget_left = session.repair_budget is None or session.repairs_used < session.repair_budget
        if not candidates or not budget_left:
            break
        session.repair(candidates[0], policy=repair_policy(candidates[0]), max_actions=max_actions)
    session.audit()
    return session.record()
