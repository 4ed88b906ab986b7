"""Lease deadlines on a monotonic clock: renew, look up, and pop the ones that ran out.

Pure bookkeeping with an injectable clock (``time.monotonic`` by default), so a
wall-clock jump neither expires nor prolongs a lease, and tests move time by
hand. Not thread-safe: the embedded store guards it with a lock.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass
class Lease:
    """One live lease."""

    lease_id: str
    key: tuple[str, str]
    """(service, instance_id) of the instance it holds."""
    token_hash: str
    ttl_ms: int
    deadline: float
    """Monotonic time (seconds) at which it expires."""


class LeaseTable:
    """The live leases of one registry node, ordered by deadline."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._leases

    def get(self, lease_id: str) -> Lease | None:
        """The lease, even if its deadline passed but it was not popped yet."""
        return self._leases.get(lease_id)

    def grant(self, lease_id: str, key: tuple[str, str], token_hash: str, ttl_ms: int) -> Lease:
        """Create or replace a lease; it expires ttl_ms from now."""
        lease = Lease(lease_id, key, token_hash, ttl_ms, self._clock() + ttl_ms / 1000)
        self._leases[lease_id] = lease
        heapq.heappush(self._heap, (lease.deadline, lease_id))
        return lease

    def renew(self, lease_id: str) -> Lease | None:
        """Restart the TTL of a live lease; None when unknown or already past its deadline."""
        lease = self._leases.get(lease_id)
        now = self._clock()
        if lease is None or lease.deadline <= now:
            return None
        lease.deadline = now + lease.ttl_ms / 1000
        heapq.heappush(self._heap, (lease.deadline, lease_id))
        return lease

    def revoke(self, lease_id: str) -> Lease | None:
        """Forget a lease (its instance was deregistered)."""
        return self._leases.pop(lease_id, None)

    def pop_expired(self, limit: int = 1000) -> list[Lease]:
        """Remove and return up to ``limit`` leases whose deadline has passed."""
        now = self._clock()
        expired: list[Lease] = []
        while self._heap and len(expired) < limit:
            deadline, lease_id = self._heap[0]
            if deadline > now:
                break
            heapq.heappop(self._heap)
            lease = self._leases.get(lease_id)
            # Renewals push a new heap entry; stale entries are skipped here.
            if lease is not None and lease.deadline == deadline:
                del self._leases[lease_id]
                expired.append(lease)
        return expired

    def seconds_to_next_deadline(self) -> float | None:
        """How long until the earliest deadline (may be stale-early); None when empty."""
        while self._heap:
            deadline, lease_id = self._heap[0]
            lease = self._leases.get(lease_id)
            if lease is None or lease.deadline != deadline:
                heapq.heappop(self._heap)
                continue
            return max(0.0, deadline - self._clock())
        return None
