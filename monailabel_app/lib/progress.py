"""Progress of long requests (the volume task) that a client polls: `GET /ibisagent/progress/{progress_id}`.

The client makes the id (32 lowercase hex, e.g. `uuid.uuid4().hex`) and sends it as `params.progress_id`; the task
reports its phase and slice counts here while it works. Entries are few and short-lived: at most `MAX_ENTRIES`,
dropped `KEEP_S` seconds after their last update (oldest first beyond the count), so the board never grows.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .errors import RequestError

PROGRESS_ID = re.compile(r"[0-9a-f]{32}")
MAX_ENTRIES = 256
KEEP_S = 600.0
PHASES = ("key", "propagate", "audit", "repair")


@dataclass
class _Entry:
    started: float
    updated: float
    state: str = "running"  # "running" | "done" | "failed"
    phase: str = "key"
    slices_done: int = 0
    slices_total: int = 0
    seconds: float = 0.0


class ProgressBoard:
    """Progress entries by client-made id. Thread-safe; `clock` is injectable for tests."""

    def __init__(
        self, max_entries: int = MAX_ENTRIES, keep_s: float = KEEP_S, clock: Callable[[], float] = time.monotonic
    ):
        self.max_entries, self.keep_s, self._clock = max_entries, keep_s, clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    @staticmethod
    def check_id(progress_id: object) -> str:
        if not isinstance(progress_id, str) or not PROGRESS_ID.fullmatch(progress_id):
            shown = repr(progress_id)[:60]
            raise RequestError(
                400, f"params.progress_id must be 32 lowercase hex characters (e.g. uuid4().hex), got {shown}"
            )
        return progress_id

    def start(self, progress_id: str, slices_total: int) -> Progress:
        """A new entry (an earlier finished one with the same id is replaced; a running one is a 409)."""
        self.check_id(progress_id)
        now = self._clock()
        with self._lock:
            self._purge(now)
            old = self._entries.get(progress_id)
            if old is not None and old.state == "running":
                raise RequestError(
                    409, f"params.progress_id {progress_id!r} belongs to a request still running; make a new id"
                )
            self._entries[progress_id] = _Entry(now, now, slices_total=slices_total)
            self._entries.move_to_end(progress_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return Progress(self, progress_id)

    def update(self, progress_id: str, **changes) -> None:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(progress_id)
            if entry is None:
                return  # dropped (bounded count): the request goes on without a report
            for name, value in changes.items():
                setattr(entry, name, value)
            entry.updated = now
            entry.seconds = now - entry.started

    def get(self, progress_id: str) -> dict:
        """The entry as the endpoint answers it; 404 for an unknown or expired id."""
        if not isinstance(progress_id, str) or not PROGRESS_ID.fullmatch(progress_id):
            raise RequestError(404, f"progress id {progress_id[:40]!r} is not 32 lowercase hex characters")
        now = self._clock()
        with self._lock:
            self._purge(now)
            entry = self._entries.get(progress_id)
            if entry is None:
                raise RequestError(
                    404,
                    f"progress id {progress_id!r} is unknown or expired (entries are kept {self.keep_s:g} s); send it "
                    "as params.progress_id with the request",
                )
            seconds = now - entry.started if entry.state == "running" else entry.seconds
            return {
                "state": entry.state,
                "phase": entry.phase,
                "slices_done": entry.slices_done,
                "slices_total": entry.slices_total,
                "seconds": round(seconds, 3),
            }

    def _purge(self, now: float) -> None:
        for pid in [p for p, e in self._entries.items() if now - e.updated > self.keep_s]:
            del self._entries[pid]


class Progress:
    """One request's handle on its entry (`ProgressBoard.start`); `NO_PROGRESS` when the client sent no id."""

    def __init__(self, board: ProgressBoard | None, progress_id: str | None):
        self.board, self.id = board, progress_id
        self.done = 0

    def phase(self, phase: str, slices_total: int | None = None) -> None:
        self.done = 0
        changes = {"phase": phase, "slices_done": 0}
        if slices_total is not None:
            changes["slices_total"] = slices_total
        self._update(**changes)

    def tick(self, n: int = 1) -> None:
        self.done += n
        self._update(slices_done=self.done)

    def finish(self, ok: bool) -> None:
        self._update(state="done" if ok else "failed")

    def _update(self, **changes) -> None:
        if self.board is not None and self.id is not None:
            self.board.update(self.id, **changes)


NO_PROGRESS = Progress(None, None)
BOARD = ProgressBoard()  # the server's one board: the task writes it, the endpoint reads it
