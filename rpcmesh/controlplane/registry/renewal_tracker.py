"""Lease deadlines of the PostgreSQL expiry leader: renewal counters in, overdue leases out.

The shared store keeps no deadlines. Each lease row carries a renewal counter
that every renewal (through any node) bumps; the one node that leads expiry
observes those counters and keeps each lease's deadline on its own monotonic
clock: when it sees a counter move, that lease's deadline becomes now + TTL.
An overdue lease is expired with a delete conditional on the counter still
being the one seen, so a renewal that raced the expiry wins. No wall-clock
value is ever read or stored, so a wall-clock jump (here or on the database
server) neither expires nor prolongs a lease.

Pure bookkeeping with an injectable clock (``time.monotonic`` by default).
Not thread-safe: it lives on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from rpcmesh.controlplane.registry.deadline_queue import DeadlineQueue
from rpcmesh.controlplane.registry.leases import Clock


@dataclass
class TrackedLease:
    """What the leader knows of one lease."""

    lease_id: str
    ttl_ms: int
    renewals: int
    """The renewal counter as last seen in the store."""
    deadline: float
    """Monotonic time (seconds) after which it may be expired."""


@dataclass(frozen=True)
class Sighting:
    """One lease as read from the store (or announced by a renewal notification)."""

    lease_id: str
    ttl_ms: int
    renewals: int


class RenewalTracker:
    """Monotonic deadlines driven by renewal counters; only the expiry leader keeps one."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._leases: dict[str, TrackedLease] = {}
        self._deadlines: DeadlineQueue[str] = DeadlineQueue()

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._leases

    def get(self, lease_id: str) -> TrackedLease | None:
        """The tracked lease, overdue or not."""
        return self._leases.get(lease_id)

    def _set(self, lease_id: str, ttl_ms: int, renewals: int) -> TrackedLease:
        lease = TrackedLease(lease_id, ttl_ms, renewals, self._clock() + ttl_ms / 1000)
        self._leases[lease_id] = lease
        self._deadlines.set(lease_id, lease.deadline)
        return lease

    def take_over(self, sightings: Iterable[Sighting]) -> None:
        """Become the leader over these leases: each gets its full TTL from now (as etcd does)."""
        self.clear()
        for sighting in sightings:
            self._set(sighting.lease_id, sighting.ttl_ms, sighting.renewals)

    def observe(self, sighting: Sighting) -> bool:
        """A lease's counter as read now; a new lease or a moved counter restarts its TTL.

        Returns:
            True when the deadline was reset; False for a counter already seen (or older).
        """
        lease = self._leases.get(sighting.lease_id)
        if lease is not None and sighting.renewals <= lease.renewals:
            return False
        self._set(sighting.lease_id, sighting.ttl_ms, sighting.renewals)
        return True

    def forget(self, lease_id: str) -> None:
        """The lease is gone from the store (expired, deregistered or replaced)."""
        self._leases.pop(lease_id, None)
        self._deadlines.discard(lease_id)

    def clear(self) -> None:
        """Forget everything (leadership lost)."""
        self._leases.clear()
        self._deadlines.clear()

    def due(self, limit: int = 1000) -> list[TrackedLease]:
        """Up to ``limit`` leases past their deadline, earliest first; they stay tracked.

        The caller tries a conditional delete of each, then calls :meth:`settle`.
        """
        return [self._leases[lease_id] for lease_id in self._deadlines.due(self._clock(), limit)]

    def settle(self, lease_id: str, current: int | None) -> bool:
        """Record the outcome of an expiry attempt on a due lease.

        Args:
            lease_id: the lease the leader tried to expire.
            current: its renewal counter as found under the lock, or None when its row is gone.

        Returns:
            True when the lease expires (it was still at the counter seen, or is gone);
            False when a renewal won the race and its deadline was reset.
        """
        lease = self._leases.get(lease_id)
        if current is None or lease is None or current == lease.renewals:
            self.forget(lease_id)
            return True
        self._set(lease_id, lease.ttl_ms, max(current, lease.renewals))
        return False

    def seconds_to_next_deadline(self) -> float | None:
        """How long until the earliest deadline; None when nothing is tracked."""
        deadline = self._deadlines.next_deadline()
        return None if deadline is None else max(0.0, deadline - self._clock())
