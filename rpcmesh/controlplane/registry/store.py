"""The one small interface the Registry keeps its state behind (SQLite or PostgreSQL).

A store holds the current instances, an append-only event log with a retained
window, and the lease deadlines (never on a wall clock). Writes are decisions: the caller passes a
pure function of the stored instance (see :mod:`.transitions`) that the store
runs inside its write transaction, so the rules are the same for every backend
and a rejected decision changes nothing. Committed events reach the node's
view through the ``EventSink`` given to :meth:`RegistryStore.open`, always in
revision order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from rpcmesh.controlplane.registry.model import Change, Committed, Event, StoredInstance

T = TypeVar("T")

Decide = Callable[[StoredInstance | None, int], Change[T]]
"""(instance as stored or None, revision the change would get) -> Change; may raise StatusError."""

EventSink = Callable[[Sequence[Event]], None]
"""Receives committed events in revision order, on the event loop thread."""

ResetSink = Callable[["Loaded"], None]
"""Receives the whole state again when the store cannot replay what the node missed (log compacted)."""


@dataclass(frozen=True)
class Loaded:
    """The state a store holds when it opens."""

    instances: list[StoredInstance]
    revision: int
    """Revision of the last committed event."""


class RegistryStore(Protocol):
    """Durable registry state, shared by every node that uses the same store."""

    @property
    def compact_revision(self) -> int:
        """Events up to this revision are no longer retained."""
        ...

    @property
    def is_leader(self) -> bool:
        """This node expires leases and runs probes (always, for a store used by one node)."""
        ...

    async def open(self, sink: EventSink, reset: ResetSink | None = None) -> Loaded:
        """Open (creating the schema) and return the current state.

        ``reset`` is called with the whole state when the node fell behind the
        retained log (a shared store only): the node must rebuild from it.

        Every lease gets its full TTL again on a monotonic clock: at open for the
        embedded store, when a node takes over expiry for the shared one.
        """
        ...

    async def close(self) -> None:
        """Stop background work and release connections."""
        ...

    async def mutate(self, service: str, instance_id: str, decide: Decide[Any]) -> Committed[Any]:
        """Run ``decide`` on the stored instance and commit its change atomically.

        Returns once the change is durable and its event was passed to the sink.
        A StatusError raised by ``decide`` propagates and nothing changes.
        """
        ...

    async def renew(self, lease_id: str, lease_token: str) -> int:
        """Restart a lease's TTL and return it in ms.

        Raises:
            NotFoundError: unknown or expired lease.
            PermissionDeniedError: wrong or missing token.
        """
        ...

    async def expire_due(self) -> int:
        """Delete instances whose lease ran out (DELETE events, reason "expired"); returns how many."""
        ...

    def seconds_to_next_expiry(self) -> float:
        """How long the expiry loop may sleep before calling :meth:`expire_due` again."""
        ...

    async def stored_revision(self) -> int:
        """The revision the store itself has reached, which this node's view may not have read yet.

        The embedded store answers its own revision; a shared one asks the database, so a
        node that is merely late (it reads the log after the others) can tell that from a
        store that never reached a revision (it lost its data, or is another registry).

        Raises:
            UnavailableError: the store cannot be asked now.
        """
        ...

    async def events_after(self, revision: int, limit: int) -> list[Event]:
        """Up to ``limit`` events with revision > ``revision``, in order.

        Raises:
            OutOfRangeError: events after ``revision`` are no longer retained.
        """
        ...
