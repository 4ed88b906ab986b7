"""Subscriptions and the broker-driven group runtime (the dispatcher of one group on one topic).

A :class:`Subscription` is one Subscribe stream, a member of one group per
matching topic. :class:`GroupRuntime` serves a group whose deliveries the
broker decides itself (:class:`~rpcmesh.controlplane.bus.group_state.GroupState`;
SQLite, and broadcast subscriptions on every backend): its dispatcher reads the
log ahead, hands batches to members, and dead-letters what the state gives up
on, retrying the write until it is stored (only then may the ack floor pass
the message). :class:`GroupRunner` is what both it and
:class:`~rpcmesh.controlplane.bus.consumer_runtime.ConsumerGroupRuntime` offer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from rpcmesh.controlplane.bus import topics
from rpcmesh.controlplane.bus.group_state import Dead, GroupState
from rpcmesh.controlplane.bus.store import GroupRecord
from rpcmesh.controlplane.bus.validation import SubscriptionSettings
from rpcmesh.errors import NotFoundError, OutOfRangeError, invalid_argument
from rpcmesh.telemetry import get_telemetry
from rpcmesh.v1 import bus_pb2

if TYPE_CHECKING:
    from rpcmesh.controlplane.bus.broker import Broker

logger = logging.getLogger(__name__)

READ_AHEAD = 2048
"""Messages a dispatcher keeps buffered ahead of its members."""

POLL_INTERVAL = 0.5
"""Longest a dispatcher sleeps without a wake-up (picks up writes by other nodes)."""

BURY_RETRY_FIRST = 0.05
"""Seconds before the first retry of a failed dead-letter write (doubles per retry)."""

BURY_RETRY_MAX = 2.0
"""Longest wait between dead-letter write retries."""


class Delivered(Protocol):
    """What a runtime hands to a subscription: a message and its attempt."""

    @property
    def message(self) -> bus_pb2.BusMessage:  # noqa: D102
        ...

    @property
    def attempts(self) -> int:  # noqa: D102
        ...


class GroupRunner(Protocol):
    """A group on a topic with members on this node.

    :class:`GroupRuntime` (the broker decides deliveries) or
    :class:`~rpcmesh.controlplane.bus.consumer_runtime.ConsumerGroupRuntime` (the backend does).
    """

    topic: str
    name: str
    durable: bool
    members: list[Subscription]
    wake: asyncio.Event
    task: asyncio.Task[None] | None

    def attach(self, member: Subscription) -> None:  # noqa: D102
        ...

    async def detach(self, member: Subscription) -> None:  # noqa: D102
        ...

    def held_by(self, member: Subscription) -> int:  # noqa: D102
        ...

    def ack(self, seq: int) -> None:  # noqa: D102
        ...

    def nak(self, seq: int, delay: float | None, error: str = "") -> None:  # noqa: D102
        ...

    def term(self, seq: int, reason: str) -> None:  # noqa: D102
        ...

    async def close(self) -> None:  # noqa: D102
        ...


class Subscription:
    """One Subscribe stream: a member of one group per matching topic."""

    _ids = itertools.count(1)

    def __init__(self, broker: Broker, settings: SubscriptionSettings) -> None:
        self.id = next(self._ids)
        self.broker = broker
        self.settings = settings
        self.outbox: asyncio.Queue[list[bus_pb2.Delivery] | None] = asyncio.Queue()
        self.groups: dict[str, GroupRunner] = {}
        self.closed = False
        self._closing: asyncio.Future[None] | None = None

    def __hash__(self) -> int:
        return self.id

    @property
    def capacity(self) -> int:
        """Deliveries this stream may still receive."""
        held = sum(runtime.held_by(self) for runtime in self.groups.values())
        return self.settings.max_in_flight - held

    def deliver(self, topic: str, group: str, entries: Sequence[Delivered]) -> None:
        """Queue a batch for the stream writer."""
        deliveries = [bus_pb2.Delivery(message=entry.message, attempt=entry.attempts) for entry in entries]
        self.outbox.put_nowait(deliveries)
        metrics = get_telemetry().metrics
        if metrics.enabled:
            again = sum(1 for entry in entries if entry.attempts > 1)
            if again:
                metrics.bus_redelivered(topic, group, again)
            if len(entries) > again:
                metrics.bus_delivered(topic, group, len(entries) - again)

    def wake_groups(self) -> None:
        """Capacity freed: let the dispatchers run."""
        for runtime in self.groups.values():
            runtime.wake.set()

    def _runtime(self, field: str, ref: bus_pb2.MessageRef) -> GroupRunner:
        runtime = self.groups.get(ref.topic)
        if runtime is None:
            if not topics.matches(self.settings.topic, ref.topic):
                raise invalid_argument(f"{field}.topic", f"{ref.topic!r} is not part of this subscription")
            raise NotFoundError(f"{field}.topic: {ref.topic!r} has no messages for this subscription")
        if ref.sequence > self.broker.store.last_sequence(ref.topic):
            raise OutOfRangeError(f"{field}.sequence: {ref.sequence} was never published on {ref.topic!r}")
        return runtime

    def ack(self, refs: Sequence[bus_pb2.MessageRef]) -> None:
        """Acknowledge deliveries; unknown (already done) ones are ignored."""
        for index, ref in enumerate(refs):
            self._runtime(f"ack.refs[{index}]", ref).ack(ref.sequence)

    def nak(self, refs: Sequence[bus_pb2.MessageRef], delay: float | None, error: str = "") -> None:
        """Return deliveries for redelivery after ``delay`` (None: the backoff); ``error`` says why."""
        for index, ref in enumerate(refs):
            self._runtime(f"nak.refs[{index}]", ref).nak(ref.sequence, delay, error)

    def term(self, refs: Sequence[bus_pb2.MessageRef], reason: str) -> None:
        """Dead-letter deliveries at once."""
        for index, ref in enumerate(refs):
            self._runtime(f"term.refs[{index}]", ref).term(ref.sequence, reason)

    async def close(self) -> None:
        """Leave every group; in-flight deliveries go to other members at once.

        Every caller returns once the subscription has left all its groups (their state
        saved), also when another caller started the close: the broker's shutdown relies
        on that before it closes the store. The close runs to its end even if a caller
        is cancelled.
        """
        if self._closing is None:
            self.closed = True
            self._closing = asyncio.ensure_future(self._close())
            self.broker._background.add(self._closing)
            self._closing.add_done_callback(self.broker._background.discard)
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self.broker._subscriptions.discard(self)
        link = self.broker.node_link
        if link is not None:
            await link.withdraw(self.settings.topic)
        for runtime in list(self.groups.values()):
            await runtime.detach(self)
        self.groups.clear()
        self.outbox.put_nowait(None)


@dataclass(eq=False)
class GroupRuntime:
    """A group on a topic with attached members and its dispatcher task."""

    broker: Broker
    topic: str
    name: str
    durable: bool
    state: GroupState
    members: list[Subscription] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    dirty: bool = False
    burying: int = 0
    task: asyncio.Task[None] | None = None
    _turn: int = 0
    _buries: set[asyncio.Task[None]] = field(default_factory=set)

    def attach(self, member: Subscription) -> None:
        """Add a member and make sure the dispatcher runs."""
        self.members.append(member)
        member.groups[self.topic] = self
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._dispatch(), name=f"bus-dispatch-{self.topic}-{self.name}")
        self.wake.set()

    async def detach(self, member: Subscription) -> None:
        """Remove a member; its in-flight deliveries are offered again."""
        if member in self.members:
            self.members.remove(member)
        dead = self.state.member_gone(member)
        if dead:
            self.bury(dead)
        self.dirty = True
        self.wake.set()
        if not self.members:
            await self.broker._retire(self)

    def held_by(self, member: Subscription) -> int:
        """In-flight deliveries of ``member``."""
        return self.state.held_by(member)

    def ack(self, seq: int) -> None:
        """Acknowledge a delivery (unknown ones are ignored)."""
        if self.state.ack(seq):
            self.dirty = True
            self.wake.set()

    def nak(self, seq: int, delay: float | None, error: str = "") -> None:
        """Redeliver after ``delay`` (None: the backoff); ``error`` is kept as the last error."""
        dead = self.state.nak(seq, self.broker.clock(), delay, error)
        if dead is not None:
            self.bury([dead])
        self.dirty = True
        self.wake.set()

    def term(self, seq: int, reason: str) -> None:
        """Dead-letter at once."""
        dead = self.state.term(seq, reason)
        if dead is not None:
            self.bury([dead])
        self.wake.set()

    async def close(self) -> None:
        """Stop the dispatcher and persist progress (the last member left or the broker stops)."""
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        if self._buries:
            # A dead letter stored now lets the saved floor pass its message (else it is
            # delivered again later); retired, each write is tried once more at most.
            await asyncio.gather(*self._buries, return_exceptions=True)
        if self.durable:
            try:
                await self.broker.store.save_group(self.record())
            except Exception:
                logger.exception("saving group %s/%s failed", self.topic, self.name)
            else:
                self.dirty = False

    def bury(self, dead: list[Dead]) -> None:
        """Dead-letter messages the state gave up on (durable groups only)."""
        self.dirty = True
        if not self.durable:
            for item in dead:
                logger.info(
                    "broadcast delivery of %s#%d dropped: %s", self.topic, item.message.sequence, item.reason
                )
            return
        self.burying += 1
        task = asyncio.create_task(self._bury(dead))
        self.broker._background.add(task)
        task.add_done_callback(self.broker._background.discard)
        self._buries.add(task)
        task.add_done_callback(self._buries.discard)

    async def _bury(self, dead: list[Dead]) -> None:
        """Store the dead letters, retrying; only then may the ack floor pass them.

        When the broker stops or the group is retired first, the messages stay below
        the persisted floor and are delivered again later (their dead letters' ids
        make a repeated write a duplicate): nothing is lost.
        """
        delay = BURY_RETRY_FIRST
        try:
            while True:
                try:
                    await self.broker.dead_letter(self.topic, self.name, dead)
                except Exception:
                    logger.exception("dead-lettering on %s/%s failed; retrying", self.topic, self.name)
                else:
                    self.state.buried(int(item.message.sequence) for item in dead)
                    self.dirty = True
                    self.wake.set()
                    return
                retired = self.broker._groups.get((self.topic, self.name)) is not self
                if retired or self.broker.stopped.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.broker.stopped.wait(), delay)
                delay = min(delay * 2, BURY_RETRY_MAX)
        finally:
            self.burying -= 1

    def record(self) -> GroupRecord:
        """The durable state to persist."""
        return GroupRecord(
            topic=self.topic,
            name=self.name,
            ack_floor=self.state.ack_floor,
            acked_above_floor=frozenset(self.state.acked_above_floor),
            attempts=self.state.attempts_to_keep(),
        )

    async def _dispatch(self) -> None:
        broker = self.broker
        store = broker.store
        state = self.state
        try:
            while self.members:
                self.wake.clear()
                now = broker.clock()
                dead = state.expire(now)
                if dead:
                    self.bury(dead)
                if state.buffered < READ_AHEAD and state.next_sequence <= store.last_sequence(self.topic):
                    messages, through = await store.read(self.topic, state.next_sequence, READ_AHEAD)
                    state.add_read(messages, through)
                    now = broker.clock()
                    if not self.members:
                        break
                sent = False
                count = len(self.members)
                for offset in range(count):
                    member = self.members[(self._turn + offset) % count]
                    room = min(member.capacity, member.settings.max_batch)
                    if room <= 0:
                        continue
                    entries = state.take(member, room, now, member.settings.policy)
                    if entries:
                        # One metrics label for all broadcast members (their names are per stream).
                        member.deliver(self.topic, self.name if self.durable else "_broadcast", entries)
                        self.dirty = True  # attempt counts are persisted with the group
                        sent = True
                self._turn += 1
                if sent:
                    await asyncio.sleep(0)
                    continue
                if self.wake.is_set():
                    continue
                timer = state.next_timer()
                timeout = POLL_INTERVAL if timer is None else max(0.0, min(POLL_INTERVAL, timer - now))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("dispatcher of %s/%s failed", self.topic, self.name)
