"""Keys ordered by deadline: arm, re-arm or drop a key, and take the ones that fell due.

The registry's lease bookkeeping is built on it: :class:`~rpcmesh.controlplane.registry.leases.LeaseTable`
(SQLite store) and :class:`~rpcmesh.controlplane.registry.renewal_tracker.RenewalTracker`
(PostgreSQL expiry leader). Each key has at most one deadline. A heap of
``(deadline, key)`` entries orders them; re-arming or dropping a key leaves its old
entry behind, and such stale entries are skipped when they reach the top (lazy
deletion). So that re-arming the same key over and over does not grow the heap
without bound, it is rebuilt from the live deadlines once the stale entries
outnumber the live ones by :data:`COMPACT_FACTOR` (and there are more than
:data:`COMPACT_MIN` of them): after every call, the heap holds at most
``live + max(COMPACT_MIN, COMPACT_FACTOR * live)`` entries.

Keys with equal deadlines fall due in key order. Deadlines are plain floats on
whatever clock the caller uses: the queue never reads a clock. Not thread-safe.
"""

from __future__ import annotations

import heapq
import sys
from typing import Any, Generic, Protocol, TypeVar

COMPACT_FACTOR = 2
"""Rebuild the heap when its stale entries exceed this many times the live keys..."""
COMPACT_MIN = 64
"""...and also exceed this many (small queues are not worth rebuilding)."""


class OrderedKey(Protocol):
    """A key type the queue can hold: hashable, and ordered (to break ties between equal deadlines)."""

    def __hash__(self) -> int: ...

    def __lt__(self, other: Any, /) -> bool: ...


K = TypeVar("K", bound=OrderedKey)


class DeadlineQueue(Generic[K]):
    """Keys by deadline, earliest first; each key armed at most once."""

    __slots__ = ("_deadlines", "_heap")

    def __init__(self) -> None:
        self._deadlines: dict[K, float] = {}
        # Holds an entry (d, key) for every armed key with deadline d, plus stale ones.
        self._heap: list[tuple[float, K]] = []

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, key: object) -> bool:
        return key in self._deadlines

    @property
    def heap_size(self) -> int:
        """Entries held in the heap, stale ones included (bounded by the compaction)."""
        return len(self._heap)

    def deadline(self, key: K) -> float | None:
        """The key's deadline; None when it is not armed."""
        return self._deadlines.get(key)

    def set(self, key: K, deadline: float) -> None:
        """Arm ``key`` to fall due at ``deadline``, replacing the deadline it had."""
        if self._deadlines.get(key) == deadline:
            return  # its entry is in the heap already
        self._deadlines[key] = deadline
        heapq.heappush(self._heap, (deadline, key))
        self._maybe_compact()

    def discard(self, key: K) -> None:
        """Disarm ``key``, if it is armed."""
        if self._deadlines.pop(key, None) is not None:
            self._maybe_compact()

    def clear(self) -> None:
        """Disarm every key."""
        self._deadlines.clear()
        self._heap.clear()

    def pop_due(self, now: float, limit: int = sys.maxsize) -> list[K]:
        """Disarm and return up to ``limit`` keys whose deadline is at or before ``now``.

        Earliest deadline first; equal deadlines in key order.
        """
        keys = [key for _, key in self._pop_due_entries(now, limit)]
        if keys:
            self._maybe_compact()
        return keys

    def due(self, now: float, limit: int = sys.maxsize) -> list[K]:
        """The keys :meth:`pop_due` would return, left armed."""
        entries = self._pop_due_entries(now, limit)
        for entry in entries:
            deadline, key = entry
            self._deadlines[key] = deadline
            heapq.heappush(self._heap, entry)
        return [key for _, key in entries]

    def next_deadline(self) -> float | None:
        """The earliest deadline of an armed key; None when none is armed."""
        heap = self._heap
        while heap:
            deadline, key = heap[0]
            if self._deadlines.get(key) == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def _pop_due_entries(self, now: float, limit: int) -> list[tuple[float, K]]:
        """Disarm and return the due entries, in order, dropping stale ones met on the way."""
        heap = self._heap
        deadlines = self._deadlines
        taken: list[tuple[float, K]] = []
        while heap and len(taken) < limit:
            entry = heap[0]
            deadline, key = entry
            if deadline > now:
                break
            heapq.heappop(heap)
            # A duplicate of a taken entry is stale too: its key is disarmed by then.
            if deadlines.get(key) == deadline:
                del deadlines[key]
                taken.append(entry)
        return taken

    def _maybe_compact(self) -> None:
        stale = len(self._heap) - len(self._deadlines)
        if stale > COMPACT_MIN and stale > COMPACT_FACTOR * len(self._deadlines):
            self._heap = [(deadline, key) for key, deadline in self._deadlines.items()]
            heapq.heapify(self._heap)
