"""The storage interface of the Bus: a per-topic message log plus consumer-group state.

The broker owns delivery decisions (:mod:`group_state`); a store only keeps
topics, appends and reads messages, and persists each group's ack floor. Two
implementations: :class:`~rpcmesh.controlplane.bus.sqlite_store.SqliteBusStore`
(embedded default) and :class:`~rpcmesh.controlplane.bus.nats_store.NatsBusStore`
(NATS JetStream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rpcmesh.controlplane.bus.consumer_ledger import Fetched
from rpcmesh.controlplane.bus.group_state import DeliveryPolicy
from rpcmesh.v1 import bus_pb2


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    """Bounds of a topic; zero means unbounded. The oldest messages go first."""

    max_messages: int = 0
    """Most messages kept."""

    max_bytes: int = 0
    """Most stored bytes kept."""

    max_age: float = 0.0
    """Seconds a message is kept."""

    def __post_init__(self) -> None:
        if self.max_messages < 0 or self.max_bytes < 0 or self.max_age < 0:
            raise ValueError("retention: limits must be >= 0")

    def to_proto(self) -> bus_pb2.Retention:
        """As the wire message."""
        retention = bus_pb2.Retention(max_messages=self.max_messages, max_bytes=self.max_bytes)
        if self.max_age:
            retention.max_age.FromNanoseconds(int(self.max_age * 1e9))
        return retention


@dataclass(frozen=True, kw_only=True)
class TopicStats:
    """A topic as stored."""

    name: str
    """The topic name."""
    retention: RetentionPolicy
    """Its bounds."""
    first_sequence: int = 0
    """Oldest retained sequence (last_sequence + 1 when empty)."""
    last_sequence: int = 0
    """Newest sequence ever assigned (0 when never written)."""
    message_count: int = 0
    """Retained messages."""
    groups: tuple[str, ...] = ()
    """Durable consumer groups."""


@dataclass(frozen=True, kw_only=True)
class GroupRecord:
    """The durable state of one consumer group on one topic."""

    topic: str
    """The topic."""
    name: str
    """The group."""
    ack_floor: int
    """Every sequence up to this one is done."""
    acked_above_floor: frozenset[int] = frozenset()
    """Done sequences above the floor."""
    attempts: dict[int, int] = field(default_factory=dict)
    """Deliveries so far of messages that were redelivered."""


@dataclass(frozen=True)
class AppendResult:
    """Outcome of storing one message."""

    id: str
    """The message id (server-assigned when the publisher left it empty)."""
    sequence: int
    """Its sequence (the original one for a duplicate)."""
    duplicate: bool = False
    """True when the id was stored within the deduplication window."""


class BusStore(Protocol):
    """Where the Bus keeps topics, messages and group state."""

    async def open(self) -> None:
        """Open storage and recover."""
        ...

    async def close(self) -> None:
        """Flush and close."""
        ...

    async def create_topic(self, name: str, retention: RetentionPolicy) -> tuple[TopicStats, bool]:
        """Create a topic; returns it and whether it was created (False: it existed)."""
        ...

    async def get_topic(self, name: str) -> TopicStats | None:
        """A topic, or None."""
        ...

    async def list_topics(self, after: str, limit: int) -> list[TopicStats]:
        """Topics sorted by name, after ``after``."""
        ...

    async def delete_topic(self, name: str) -> bool:
        """Delete a topic, its messages and groups; False when it did not exist."""
        ...

    async def append(
        self, topic: str, messages: Sequence[bus_pb2.BusMessage], *, dedup: bool = True
    ) -> list[AppendResult]:
        """Store messages durably, creating the topic if needed; one result per message.

        Fills ``id`` (when empty), ``topic``, ``sequence`` and ``publish_time`` of
        each message in place.
        """
        ...

    async def read(self, topic: str, from_sequence: int, limit: int) -> tuple[list[bus_pb2.BusMessage], int]:
        """Up to ``limit`` messages from ``from_sequence`` on, and the last sequence scanned.

        Every sequence between ``from_sequence`` and the returned one that is
        not in the list does not exist (never will): readers may skip it.
        """
        ...

    async def sequence_at(self, topic: str, time_ns: int) -> int:
        """The first sequence published at or after ``time_ns`` (last + 1 when none)."""
        ...

    async def delete_messages(self, topic: str, sequences: Sequence[int]) -> int:
        """Remove single messages; returns how many existed."""
        ...

    async def load_group(self, topic: str, name: str) -> GroupRecord | None:
        """A group's durable state, or None when the group does not exist."""
        ...

    async def save_group(self, record: GroupRecord) -> None:
        """Create or update a group's durable state (need not be durable on return)."""
        ...

    async def enforce_retention(self, now_ns: int) -> None:
        """Drop messages older than each topic's max_age."""
        ...

    def last_sequence(self, topic: str) -> int:
        """The newest committed sequence of ``topic`` known to this process (0 if unknown)."""
        ...


class GroupConsumer(Protocol):
    """A consumer group kept by the backend itself (a JetStream durable consumer).

    The backend counts deliveries, redelivers and keeps the ack floor; the
    broker only hands what it fetches to its members and reports outcomes.
    """

    policy: DeliveryPolicy
    """The group's effective policy (the one the group was created with)."""

    async def pull(self, room: int) -> None:
        """Make sure up to ``room`` more messages are on their way (no-op while a pull is open)."""
        ...

    def pull_deadline(self) -> float | None:
        """When the open pull runs out (``time.monotonic``), or None."""
        ...

    def arrivals(self) -> list[Fetched]:
        """Messages fetched since the last call."""
        ...

    async def settle(self, actions: Sequence[tuple[str, Any, float | None]]) -> None:
        """Tell the backend outcomes: ``("ack"|"nak"|"term"|"touch", handle, nak delay)``."""
        ...

    async def describe(self) -> bus_pb2.ConsumerGroupInfo:
        """Live figures of the group (over every node serving it)."""
        ...

    async def close(self, returned: Sequence[Any] = ()) -> None:
        """Stop pulling and return these handles for redelivery (the durable consumer stays)."""
        ...


@runtime_checkable
class NativeGroupStore(Protocol):
    """A store whose backend keeps consumer groups itself (see :class:`GroupConsumer`)."""

    async def open_group_consumer(
        self,
        topic: str,
        group: str,
        policy: DeliveryPolicy,
        start_sequence: int | None,
        on_arrival: Callable[[], None],
    ) -> GroupConsumer:
        """Create or find the group's consumer; ``start_sequence`` None means new messages only."""
        ...

    async def describe_group(self, topic: str, group: str) -> bus_pb2.ConsumerGroupInfo | None:
        """Figures of a group, or None when it does not exist."""
        ...
