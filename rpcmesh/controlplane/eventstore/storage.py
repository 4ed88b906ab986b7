"""The one storage interface of the EventStore, implemented for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Protocol

from rpcmesh.controlplane.eventstore.model import AppendResult, NewEvent, StoredEvent


class EventStorage(Protocol):
    """Append-only streams plus a global log; every method is safe to call concurrently."""

    async def open(self) -> None:
        """Create the schema if needed and get ready to serve."""
        ...

    async def close(self) -> None:
        """Release connections; pending appends fail."""
        ...

    async def append(self, stream: str, expected: int, events: Sequence[NewEvent]) -> AppendResult:
        """Append atomically if the stream matches ``expected``.

        Raises:
            WrongExpectedVersion: the stream is elsewhere; nothing was stored.
        """
        ...

    async def read_stream(
        self, stream: str, from_revision: int, *, backwards: bool, limit: int
    ) -> tuple[list[StoredEvent], int]:
        """Up to ``limit`` events from ``from_revision`` (inclusive; backwards -1 = end), and the revision."""
        ...

    async def read_all(
        self,
        from_position: int,
        *,
        limit: int,
        event_types: Sequence[str] = (),
        stream_prefixes: Sequence[str] = (),
    ) -> tuple[list[StoredEvent], int]:
        """Up to ``limit`` events at or after ``from_position`` passing the filters, and the log head.

        Served by indexes: by event type, or by stream name range for prefixes.
        """
        ...

    async def head(self) -> int:
        """The newest global position (0 when empty)."""
        ...

    async def wait_for_append(self, after_position: int, wait_seconds: float) -> None:
        """Return once the log head may be past ``after_position``, or after ``wait_seconds``."""
        ...


class AppendSignal:
    """Wakes waiters when the log head moves (local appends; pollers cover other nodes)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.head = 0

    def advance(self, head: int) -> None:
        """Record a new head and wake every waiter."""
        if head > self.head:
            self.head = head
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, after_position: int, wait_seconds: float) -> None:
        """Wait until the head passes ``after_position`` or the timeout ends."""
        if self.head > after_position:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), wait_seconds)
