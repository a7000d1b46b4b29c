"""Change events: one record per commit, rejection, restore, delete, rename, cache insert and
eviction, kept by the daemon in a ring and streamed to any number of followers
(`fusestore events`, `fusestore.tree`).

The daemon never waits for a follower. Events go into a ring of the last `keep` events (any
thread may add one); each follower reads the ring from its own position in its own task, and
one that falls more than the ring behind gets a `dropped` marker saying how many it missed and
is disconnected. A follower costs the daemon nothing while it keeps up but the copy of each
event it sends.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time

import msgspec
import trio

KINDS = ("commit", "reject", "quarantine", "restore", "delete", "rename", "cache-insert", "cache-evict", "dropped")


class Event(msgspec.Struct, omit_defaults=True):
    """`generation`: for a commit or delete, the backup generation the replaced content
    became (1, the newest), absent when none was kept; for a restore, the generation put back.
    `source`: the old name of a rename. `reason`: why content was refused, quarantined or an
    entry left the cache (lru, expired, cleared), or what a `dropped` marker missed."""

    seq: int
    time: float
    kind: str
    path: str
    size: int | None = None
    generation: int | None = None
    reason: str | None = None
    source: str | None = None
    quarantined: str | None = None


class Note(msgspec.Struct, frozen=True, omit_defaults=True):
    """An event reported to the daemon by another process (a restore through the mount, a cache
    insert through the API): the daemon numbers and times it."""

    kind: str
    path: str
    size: int | None = None
    generation: int | None = None
    reason: str | None = None


class EventHub:
    """The daemon's ring of events. `emit` from any thread; `follow` in trio."""

    def __init__(self, keep: int = 10000):
        self._lock = threading.Lock()
        self._ring: collections.deque[Event] = collections.deque(maxlen=keep)
        self._seq = 0
        self._waiting = trio.lowlevel.ParkingLot()
        self._token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None
        self._wake_queued = False
        self.followers = 0  # tasks in `wait_after` or about to be: each emit wakes them

    def attach(self) -> None:
        """Call once from the trio thread that serves followers."""
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()

    @property
    def last_seq(self) -> int:
        return self._seq

    def emit(self, kind: str, path: str, **fields) -> None:
        with self._lock:
            self._seq += 1
            self._ring.append(Event(self._seq, time.time(), kind, path, **fields))
            if not self.followers or self._wake_queued:
                return
            self._wake_queued = True
        if threading.get_ident() == self._trio_thread:
            self._wake()
        elif self._token is not None:
            try:
                self._token.run_sync_soon(self._wake)
            except trio.RunFinishedError:
                pass

    def _wake(self) -> None:
        with self._lock:
            self._wake_queued = False
        self._waiting.unpark_all()

    def after(self, seq: int) -> tuple[list[Event], int]:
        """Events numbered above `seq` still in the ring, and how many above it were lost."""
        with self._lock:
            if not self._ring or self._ring[-1].seq <= seq:
                return [], 0
            start = max(seq + 1, self._ring[0].seq)
            newest = list(itertools.islice(reversed(self._ring), self._ring[-1].seq - start + 1))
            return newest[::-1], start - (seq + 1)  # O(new events), not O(ring), per call

    def since(self, when: float) -> int:
        """The number of the last event before time `when` (to follow from)."""
        with self._lock:
            before = [e.seq for e in self._ring if e.time < when]
            if before:
                return before[-1]
            return self._ring[0].seq - 1 if self._ring else self._seq

    async def wait_after(self, seq: int) -> None:
        """Return once an event numbered above `seq` exists."""
        while self._seq <= seq:
            await self._waiting.park()
