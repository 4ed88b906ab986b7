"""Limits against abuse: sizes, concurrency per connection and per identity, stream caps, keepalive.

:class:`Limits` holds the numbers; :meth:`Limits.server_options` turns the
transport ones into grpc server options (message and metadata size, HTTP/2
streams per connection, keepalive enforcement). :class:`ConcurrencyTracker`
counts calls in flight per connection and per identity, and long-lived watches
and subscriptions per identity, so the interceptor can refuse the excess with
RESOURCE_EXHAUSTED at once instead of queueing it (pure, I/O-free).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

__all__ = ["ConcurrencyTracker", "Limits", "Slot"]


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Caps the control plane enforces; defaults suit a control plane shared by many services."""

    max_receive_message_bytes: int = 3 * 1024 * 1024 // 2
    """Largest request message (about 1.5 MiB); larger ones answer RESOURCE_EXHAUSTED."""

    max_send_message_bytes: int = 4 * 1024 * 1024
    """Largest response message."""

    max_metadata_bytes: int = 16 * 1024
    """Largest request metadata (headers) per call."""

    max_calls_per_connection: int = 1024
    """Calls and streams in flight on one connection; more answer RESOURCE_EXHAUSTED.

    Note that grpc shares one connection between channels with equal target and
    options (global subchannel pool); a client that needs more in flight opens
    channels with ``("grpc.use_local_subchannel_pool", 1)``.
    """

    max_calls_per_identity: int = 4096
    """Calls and streams in flight per identity, over all its connections."""

    max_watches_per_identity: int = 64
    """Open Watch and WatchSaga streams per identity."""

    max_subscriptions_per_identity: int = 128
    """Open Bus and EventStore subscriptions per identity."""

    max_leases_per_identity: int = 1024
    """Registered instances (leases) one identity may hold at once; more answer RESOURCE_EXHAUSTED.

    Exact on one node (an identity's registrations are checked and written one at a time); on
    several nodes of one PostgreSQL store each node counts on its own view, so registrations sent
    through several nodes at the same moment can pass it by a few."""

    max_concurrent_rpcs: int = 8192
    """Calls in flight in the whole server (grpc refuses the excess with RESOURCE_EXHAUSTED)."""

    keepalive_time_ms: int = 60_000
    """The server pings an idle connection this often to find dead peers."""

    keepalive_timeout_ms: int = 20_000
    """A ping unanswered this long closes the connection."""

    min_client_ping_interval_ms: int = 10_000
    """Clients pinging more often than this are told to go away (GOAWAY too_many_pings)."""

    max_ping_strikes: int = 2
    """Too-frequent pings tolerated before the connection is closed."""

    max_connection_idle_ms: int = 30 * 60_000
    """A connection without calls for this long is closed."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"limits.{name}: must be an integer >= 0, got {value!r}")
        if self.max_receive_message_bytes < 1024:
            raise ValueError("limits.max_receive_message_bytes: must be at least 1024")
        if self.max_calls_per_connection < 1 or self.max_calls_per_identity < 1:
            raise ValueError("limits.max_calls_per_connection/identity: must be at least 1")

    def server_options(self) -> list[tuple[str, Any]]:
        """The grpc server options for the transport limits and keepalive enforcement."""
        return [
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
            ("grpc.max_send_message_length", self.max_send_message_bytes),
            ("grpc.max_metadata_size", self.max_metadata_bytes),
            # HTTP/2 cap above the interceptor's, so the interceptor answers
            # RESOURCE_EXHAUSTED before the transport starts queueing streams.
            ("grpc.max_concurrent_streams", self.max_calls_per_connection + 16),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", self.min_client_ping_interval_ms),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
            ("grpc.max_connection_idle_ms", self.max_connection_idle_ms),
        ]


@dataclass(frozen=True)
class Slot:
    """One admitted call, to hand back to :meth:`ConcurrencyTracker.release`."""

    connection: str
    identity: str
    kind: str | None


class ConcurrencyTracker:
    """Counts calls in flight per connection and identity, and long-lived streams per identity."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._per_connection: Counter[str] = Counter()
        self._per_identity: Counter[str] = Counter()
        self._streams: Counter[tuple[str, str]] = Counter()

    def acquire_connection(self, connection: str) -> str | None:
        """Admit one call on ``connection``; returns why not (RESOURCE_EXHAUSTED) or None."""
        if self._per_connection[connection] >= self._limits.max_calls_per_connection:
            limit = self._limits.max_calls_per_connection
            return f"too many concurrent calls on this connection (limit {limit})"
        self._per_connection[connection] += 1
        return None

    def release_connection(self, connection: str) -> None:
        """Undo :meth:`acquire_connection`."""
        self._per_connection[connection] -= 1
        if self._per_connection[connection] <= 0:
            del self._per_connection[connection]

    def acquire_identity(self, identity: str, kind: str | None) -> str | None:
        """Admit one call of ``identity`` (a watch or subscription when ``kind`` says so)."""
        if self._per_identity[identity] >= self._limits.max_calls_per_identity:
            return f"too many concurrent calls for {identity!r} (limit {self._limits.max_calls_per_identity})"
        if kind is not None:
            cap = (
                self._limits.max_watches_per_identity
                if kind == "watch"
                else self._limits.max_subscriptions_per_identity
            )
            if self._streams[(identity, kind)] >= cap:
                return f"too many open {kind} streams for {identity!r} (limit {cap})"
            self._streams[(identity, kind)] += 1
        self._per_identity[identity] += 1
        return None

    def release_identity(self, identity: str, kind: str | None) -> None:
        """Undo :meth:`acquire_identity`."""
        self._per_identity[identity] -= 1
        if self._per_identity[identity] <= 0:
            del self._per_identity[identity]
        if kind is not None:
            self._streams[(identity, kind)] -= 1
            if self._streams[(identity, kind)] <= 0:
                del self._streams[(identity, kind)]

    def in_flight(self, *, connection: str | None = None, identity: str | None = None) -> int:
        """Calls in flight on a connection or for an identity (for tests and metrics)."""
        if connection is not None:
            return self._per_connection[connection]
        if identity is not None:
            return self._per_identity[identity]
        return sum(self._per_connection.values())
