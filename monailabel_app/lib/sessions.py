"""Server-side state of the ibisagent task: sessions (one interactive session each, with a time-to-live and LRU eviction) and the
pool of tool instances that keeps image embeddings between requests.

Locks: a session's `lock` is held for the whole request that uses it; a tool slot's lock is held while its tool
works on one image (tools are stateful: `set_image`, then `predict`). Lock order is session -> pool -> slot, and the
pool's own lock is only held to pick a slot, never while a tool computes.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ibisagent.session import InteractiveSession
from ibisagent.tools.base import SegmentationTool

from .errors import RequestError

_TOMBSTONES = 4096  # how many ended session ids are remembered, to answer "expired" rather than "unknown"


@dataclass(frozen=True)
class SliceKey:
    """One 2D image the tool can embed: a datastore image id, the slice and axis of a volume (None, 2 for a 2D
    image), and the file's modification time so that a replaced file is never served from a stale embedding."""

    image_id: str
    slice: int | None
    axis: int
    mtime_ns: int = 0


@dataclass
class Session:
    """A session that follow-up requests continue: the core's interactive session plus what the server keeps.

    target:       the target name the user's clicks are for.
    image:        HxWx3 uint8, the slice the session works on; `source` describes its file (`labels.ImageSource`).
    interactive:  None only until the session's first request has the tool at hand.
    """

    id: str
    key: SliceKey
    image: np.ndarray
    instruction: str
    target: str
    source: Any = None
    interactive: InteractiveSession | None = None
    encode_count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class SessionStore:
    """Sessions by id, dropped `ttl_s` seconds after their last use and least-recently-used first beyond
    `max_sessions`. Ids are made here (random hex); clients cannot choose them."""

    def __init__(
        self,
        ttl_s: float,
        max_sessions: int,
        clock: Callable[[], float] = time.monotonic,
        on_end: Callable[[Any], None] | None = None,
    ):
        """on_end(session) is called for every session that expires or is evicted (outside the store's lock), e.g.
        to free what it holds."""
        if ttl_s <= 0 or max_sessions < 1:
            raise ValueError(f"need ttl_s > 0 and max_sessions >= 1, got {ttl_s} and {max_sessions}")
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._on_end = on_end
        self._gone: list[Any] = []  # sessions ended under the lock, handed to on_end after it
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, tuple[Session, float]] = OrderedDict()  # id -> (session, last use)
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> why it ended

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def add(self, session: Session) -> None:
        with self._lock:
            self._purge()
            self._sessions[session.id] = (session, self._clock())
            while len(self._sessions) > self.max_sessions:
                old, (gone, _) = self._sessions.popitem(last=False)
                self._end(old, f"was evicted (the server keeps at most {self.max_sessions} sessions)", gone)
        self._hand_over()

    def get(self, session_id: str) -> Session:
        """The live session, marked as used now. Unknown ids raise RequestError 404, ended ones 410."""
        try:
            return self._get(session_id)
        finally:
            self._hand_over()

    def _get(self, session_id: str) -> Session:
        with self._lock:
            self._purge()
            entry = self._sessions.get(session_id)
            if entry is None:
                why = self._ended.get(session_id)
                if why is not None:
                    raise RequestError(410, f"session_id {session_id!r} {why}; start a new session (session_id null)")
                raise RequestError(
                    404, f"session_id {session_id!r} is unknown; send session_id null to start a session"
                )
            self._sessions[session_id] = (entry[0], self._clock())
            self._sessions.move_to_end(session_id)
            return entry[0]

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            n = len(self._sessions)
        self._hand_over()
        return n

    def _purge(self) -> None:
        now = self._clock()
        for sid in [sid for sid, (_, used) in self._sessions.items() if now - used > self.ttl_s]:
            gone, _ = self._sessions.pop(sid)
            self._end(sid, f"expired ({self.ttl_s:g} s without use)", gone)

    def _end(self, session_id: str, why: str, session: Any = None) -> None:
        self._ended[session_id] = why
        while len(self._ended) > _TOMBSTONES:
            self._ended.popitem(last=False)
        if self._on_end is not None and session is not None:
            self._gone.append(session)

    def _hand_over(self) -> None:
        if self._on_end is None:
            return
        with self._lock:
            gone, self._gone = self._gone, []
        for session in gone:
            self._on_end(session)


@dataclass
class _Slot:
    tool: SegmentationTool | None
    key: SliceKey | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class ToolPool:
    """The image-embedding cache: up to `size` tool instances, each holding the embedding of one SliceKey, reused
    least-recently-used first. `size` 1 (one tool) suits one user at a time; each extra slot builds another tool with
    `factory` (for model tools another copy of the weights)."""

    def __init__(self, factory: Callable[[], SegmentationTool], size: int, first: SegmentationTool | None = None):
        if size < 1:
            raise ValueError(f"the tool pool needs at least one slot, got {size}")
        self._factory = factory
        self._lock = threading.Lock()
        self._slots = [_Slot(first if i == 0 else None) for i in range(size)]
        self._order: list[int] = list(range(size))  # slot indices, least recently used first

    @contextmanager
    def use(self, key: SliceKey, image: np.ndarray) -> Iterator[tuple[SegmentationTool, bool]]:
        """Hold a tool whose current image is `image` (HxWx3 uint8, identified by `key`) and yield (tool, encoded):
        encoded is True when this call had to compute the embedding."""
        with self._lock:
            slot = self._slots[self._pick(key)]
        with slot.lock:
            if slot.tool is None:
                slot.tool = self._factory()
            encoded = slot.key != key  # another request may have taken this slot since it was picked
            if encoded:
                slot.key = None  # a failing set_image must not leave the slot claiming the new key
                slot.tool.set_image(image)
                slot.key = key
            yield slot.tool, encoded

    @contextmanager
    def borrow(self) -> Iterator[SegmentationTool]:
        """Hold a slot's tool (the least recently used that nobody holds) for work on other images (the volume
        task): its embedding is forgotten, so the next 2D request on that slot encodes its slice again."""
        with self._lock:
            slot = self._slots[self._pick(None)]
        with slot.lock:
            if slot.tool is None:
                slot.tool = self._factory()
            slot.key = None
            yield slot.tool

    def _pick(self, key: SliceKey | None) -> int:
        """The slot for `key` (under self._lock): the one holding its embedding, else the least recently used slot
        that nobody holds (a volume job may hold one for minutes), else the least recently used; marked as used."""
        index = next((i for i, s in enumerate(self._slots) if key is not None and s.key == key), None)
        if index is None:
            index = next((i for i in self._order if not self._slots[i].lock.locked()), self._order[0])
        self._order.remove(index)
        self._order.append(index)
        return index

    @property
    def encode_count(self) -> int:
        """Embeddings computed by all tools of the pool since start-up."""
        return sum(s.tool.encode_count for s in self._slots if s.tool is not None)


class ToolLeases:
    """Tools for jobs that hold one for a whole request (the volume task): up to `size` instances, built by
    `factory` when first needed and reused; the caller bounds how many jobs run at once to `size`."""

    def __init__(self, factory: Callable[[], SegmentationTool], size: int):
        if size < 1:
            raise ValueError(f"need at least one tool, got {size}")
        self._factory, self._size = factory, size
        self._lock = threading.Lock()
        self._idle: list[SegmentationTool] = []
        self._built = 0

    @contextmanager
    def lease(self) -> Iterator[SegmentationTool]:
        with self._lock:
            tool = self._idle.pop() if self._idle else None
            if tool is None:
                if self._built >= self._size:
                    raise RuntimeError(f"all {self._size} tools are in use; bound the jobs to {self._size}")
                self._built += 1
        if tool is None:
            try:
                tool = self._factory()
            except BaseException:
                with self._lock:
                    self._built -= 1
                raise
        try:
            yield tool
        finally:
            with self._lock:
                self._idle.append(tool)
