"""Lease deadlines on a monotonic clock: renew, look up, and pop the ones that ran out.

Pure bookkeeping with an injectable clock (``time.monotonic`` by default), so a
wall-clock jump neither expires nor prolongs a lease, and tests move time by
hand. Not thread-safe: the embedded store guards it with a lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rpcmesh.controlplane.registry.deadline_queue import DeadlineQueue

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
        self._deadlines: DeadlineQueue[str] = DeadlineQueue()

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
        self._deadlines.set(lease_id, lease.deadline)
        return lease

    def renew(self, lease_id: str) -> Lease | None:
        """Restart the TTL of a live lease; None when unknown or already past its deadline."""
        lease = self._leases.get(lease_id)
        now = self._clock()
        if lease is None or lease.deadline <= now:
            return None
        lease.deadline = now + lease.ttl_ms / 1000
        self._deadlines.set(lease_id, lease.deadline)
        return lease

    def revoke(self, lease_id: str) -> Lease | None:
        """Forget a lease (its instance was deregistered)."""
        self._deadlines.discard(lease_id)
        return self._leases.pop(lease_id, None)

    def restore(self, lease_id: str, previous: Lease | None) -> None:
        """Put back what ``lease_id`` was before a change that was not committed (None: no lease)."""
        if previous is None:
            self.revoke(lease_id)
            return
        self._leases[lease_id] = previous
        self._deadlines.set(lease_id, previous.deadline)

    def pop_expired(self, limit: int = 1000) -> list[Lease]:
        """Remove and return up to ``limit`` leases whose deadline has passed, earliest first."""
        return [self._leases.pop(lease_id) for lease_id in self._deadlines.pop_due(self._clock(), limit)]

    def seconds_to_next_deadline(self) -> float | None:
        """How long until the earliest deadline; None when empty."""
        deadline = self._deadlines.next_deadline()
        return None if deadline is None else max(0.0, deadline - self._clock())
