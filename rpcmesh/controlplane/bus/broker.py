"""The Bus broker: publishing, consumer groups, subscriptions and request/reply.

The broker sits between the gRPC servicer and a :class:`BusStore`. For each
(topic, group) with attached subscribers it runs one dispatcher task that
reads the log ahead, asks :class:`GroupState` what to deliver to whom, and
pushes batches onto the subscribers' outboxes. Acks update the state; group
progress (ack floor, acks above it, delivery counts of unfinished messages) is
persisted in the background every ``FLUSH_INTERVAL``: an ack lost in a crash
only causes a redelivery, a delivery lost in a crash only lowers that message's
attempt count by the deliveries made since the last save.

On a store that keeps consumer groups itself (NATS JetStream, see
:class:`~rpcmesh.controlplane.bus.store.NativeGroupStore`) durable groups are
served by :class:`~rpcmesh.controlplane.bus.consumer_runtime.ConsumerGroupRuntime`
instead: the backend decides deliveries and counts attempts.

Broadcast subscriptions are ephemeral groups of one member that are never
persisted (on every backend).

Every path that creates a topic or a durable group asks the
:class:`~rpcmesh.controlplane.bus.caps.CapLedger` first (:class:`BusCaps`):
past a cap the call is RESOURCE_EXHAUSTED and nothing is created.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence

from rpcmesh.controlplane.bus import topics
from rpcmesh.controlplane.bus.caps import BusCaps, CapLedger
from rpcmesh.controlplane.bus.consumer_runtime import ConsumerGroupRuntime
from rpcmesh.controlplane.bus.group_runtime import (
    READ_AHEAD,
    GroupRunner,
    GroupRuntime,
    Subscription,
)
from rpcmesh.controlplane.bus.group_state import Dead, GroupState
from rpcmesh.controlplane.bus.node_link import NodeLink
from rpcmesh.controlplane.bus.store import (
    AppendResult,
    BusStore,
    GroupRecord,
    NativeGroupStore,
    RetentionPolicy,
    TopicStats,
)
from rpcmesh.controlplane.bus.validation import SubscriptionSettings
from rpcmesh.errors import (
    DeadlineExceededError,
    OutOfRangeError,
    UnavailableError,
)
from rpcmesh.tasks import stop_tasks
from rpcmesh.telemetry import get_telemetry
from rpcmesh.telemetry.propagation import PROPAGATED_KEYS
from rpcmesh.v1 import bus_pb2

logger = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.05
"""Seconds between persisting group progress."""

RETENTION_INTERVAL = 1.0
"""Seconds between max_age sweeps."""

DEAD_LETTER_CONTENT_TYPE = "application/x-protobuf; messageType=rpcmesh.v1.DeadLetter"

LAG_INTERVAL = 1.0
"""Seconds between consumer-lag gauge updates."""


class Broker:
    """Everything the Bus servicer needs, over one store."""

    def __init__(
        self,
        store: BusStore,
        *,
        clock: Callable[[], float] = time.monotonic,
        node_id: str | None = None,
        caps: BusCaps | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.reply_address = f"_reply.{self.node_id}"
        self._groups: dict[tuple[str, str], GroupRunner] = {}
        self._subscriptions: set[Subscription] = set()
        self._known_topics: set[str] = set()
        self.caps = CapLedger(caps or BusCaps(), self._known_topics, store)
        """What counts against the topic and group caps."""
        self._requests: dict[str, asyncio.Future[bus_pb2.BusMessage]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.stopped = asyncio.Event()
        """Set by :meth:`stop`: background retries give up."""
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Open the store and start housekeeping."""
        await self.store.open()
        if self.node_link is not None:
            await self.node_link.listen_replies(self.node_id, self._take_reply)
        after = ""
        while True:
            page = await self.store.list_topics(after, 1000)
            if not page:
                break
            self._known_topics.update(stats.name for stats in page)
            for stats in page:
                for group in stats.groups:
                    self.caps.group_exists(stats.name, group)
            after = page[-1].name
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="bus-flush"),
            asyncio.create_task(self._retention_loop(), name="bus-retention"),
            asyncio.create_task(self._lag_loop(), name="bus-lag"),
        ]

    @property
    def node_link(self) -> NodeLink | None:
        """Request/reply with other Bus nodes, when the store offers it (NATS)."""
        link = getattr(self.store, "node_link", None)
        return link if isinstance(link, NodeLink) else None

    async def stop(self) -> None:
        """End subscriptions, persist progress and close the store."""
        self.stopped.set()
        for subscription in list(self._subscriptions):
            await subscription.close()
        # Housekeeping and dispatchers call the store (NATS requests can swallow one cancel).
        await stop_tasks([*self._tasks, *[runtime.task for runtime in self._groups.values() if runtime.task]])
        for runtime in list(self._groups.values()):
            if isinstance(runtime, ConsumerGroupRuntime):
                await runtime.close()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._flush()
        for future in self._requests.values():
            if not future.done():
                future.cancel()
        await self.store.close()

    # -- publishing ------------------------------------------------------------------

    async def publish(
        self, topic: str, messages: Sequence[bus_pb2.BusMessage], *, dedup: bool = True
    ) -> list[AppendResult]:
        """Store messages durably and wake the topic's dispatchers.

        Raises:
            ResourceExhaustedError: the topic is new and the topic cap is reached (or the groups
                of the pattern subscriptions it would join pass the group cap); nothing is stored.
        """
        reservation = await self.caps.admit_topic(topic, self._pattern_settings())
        try:
            results = await self.store.append(topic, messages, dedup=dedup)
            metrics = get_telemetry().metrics
            if metrics.enabled:
                metrics.bus_published(topic, sum(1 for result in results if not result.duplicate))
            if topic not in self._known_topics:
                self._known_topics.add(topic)
                await self._attach_patterns(topic)
        finally:
            self.caps.release(reservation)
        # The stored messages are at hand: hand them to dispatchers that are
        # caught up, sparing a read of the log (the sequences of one append
        # are contiguous).
        stored = [message for message, result in zip(messages, results, strict=True) if not result.duplicate]
        for (group_topic, _), runtime in list(self._groups.items()):
            if group_topic != topic or not isinstance(runtime, GroupRuntime):
                continue
            state = runtime.state
            if stored and state.next_sequence == stored[0].sequence and state.buffered < READ_AHEAD:
                state.add_read(stored, stored[-1].sequence)
            runtime.wake.set()
        return results

    async def create_topic(self, name: str, retention: RetentionPolicy) -> tuple[TopicStats, bool]:
        """Create a topic (or find it) and attach pattern subscribers; returns it and whether it is new.

        Raises:
            ResourceExhaustedError: the topic cap is reached; nothing is created.
        """
        reservation = await self.caps.admit_topic(name, self._pattern_settings())
        try:
            stats, created = await self.store.create_topic(name, retention)
            await self.note_topic(name)
            return stats, created
        finally:
            self.caps.release(reservation)

    async def note_topic(self, name: str) -> None:
        """Note a topic created through CreateTopic (attaches pattern subscribers)."""
        if name not in self._known_topics:
            self._known_topics.add(name)
            await self._attach_patterns(name)

    def _pattern_settings(self) -> list[SubscriptionSettings]:
        """Settings of the open subscriptions that would join a new topic (durable, by pattern)."""
        return [
            sub.settings
            for sub in self._subscriptions
            if not sub.closed and not sub.settings.broadcast and topics.is_pattern(sub.settings.topic)
        ]

    def forget_topic(self, name: str) -> None:
        """A topic was deleted: stop its dispatchers and detach members."""
        self._known_topics.discard(name)
        self.caps.forget_topic(name)
        for key, runtime in list(self._groups.items()):
            if key[0] != name:
                continue
            if runtime.task is not None:
                runtime.task.cancel()
            if isinstance(runtime, ConsumerGroupRuntime):
                task = asyncio.create_task(runtime.consumer.close())
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            for member in runtime.members:
                member.groups.pop(name, None)
            runtime.members.clear()
            del self._groups[key]

    def group_info(self, topic: str, name: str) -> bus_pb2.ConsumerGroupInfo | None:
        """Live figures of a group with attached members, or None."""
        runtime = self._groups.get((topic, name))
        if not isinstance(runtime, GroupRuntime):
            return None
        last = self.store.last_sequence(topic)
        done_above = len([seq for seq in runtime.state.acked_above_floor if seq <= last])
        return bus_pb2.ConsumerGroupInfo(
            name=name,
            pending=max(0, last - runtime.state.ack_floor - done_above),
            in_flight=len(runtime.state.in_flight),
            ack_floor=runtime.state.ack_floor,
        )

    async def describe_group(self, topic: str, name: str) -> bus_pb2.ConsumerGroupInfo | None:
        """Figures of a durable group, or None when it does not exist."""
        if isinstance(self.store, NativeGroupStore):
            return await self.store.describe_group(topic, name)
        info = self.group_info(topic, name)
        if info is not None:
            return info
        record = await self.store.load_group(topic, name)
        if record is None:
            return None
        last = self.store.last_sequence(topic)
        return bus_pb2.ConsumerGroupInfo(
            name=name,
            pending=max(0, last - record.ack_floor - len(record.acked_above_floor)),
            ack_floor=record.ack_floor,
        )

    async def dead_letter(self, topic: str, group: str, dead: Sequence[Dead]) -> None:
        """Publish dead letters of ``group`` to ``$dlq.<topic>.<group>`` (durable on return).

        Each letter's id names the topic, group, sequence and attempt count, so
        retrying after a crash stores it once within the deduplication window.
        """
        now_ns = time.time_ns()
        letters = []
        for item in dead:
            letter = bus_pb2.DeadLetter(
                message=item.message,
                group=group,
                reason=item.reason,
                attempts=item.attempts,
                last_error=item.last_error,
            )
            letter.dead_at.FromNanoseconds(now_ns)
            headers = {
                "rpcmesh-dead-topic": topic,
                "rpcmesh-dead-group": group,
                "rpcmesh-dead-reason": item.reason,
                "rpcmesh-dead-attempts": str(item.attempts),
            }
            if item.last_error:
                headers["rpcmesh-dead-last-error"] = item.last_error
            # The trace and correlation id of the message travel on with its dead letter.
            for key in PROPAGATED_KEYS:
                if key in item.message.headers:
                    headers[key] = item.message.headers[key]
            letters.append(
                bus_pb2.BusMessage(
                    id=f"dead:{group}:{item.message.sequence}:{item.message.id}"[:256],
                    payload=letter.SerializeToString(),
                    content_type=DEAD_LETTER_CONTENT_TYPE,
                    headers=headers,
                )
            )
        await self.publish(topics.dead_letter_topic(topic, group), letters)
        metrics = get_telemetry().metrics
        if metrics.enabled:
            for item in dead:
                metrics.bus_dead_lettered(topic, group, item.reason)

    # -- subscriptions ---------------------------------------------------------------

    def has_subscribers(self, topic: str) -> bool:
        """True when an open subscription matches ``topic``."""
        return any(topics.matches(sub.settings.topic, topic) for sub in self._subscriptions if not sub.closed)

    async def subscribe(self, settings: SubscriptionSettings) -> Subscription:
        """Open a subscription and attach it to every matching topic.

        Raises:
            ResourceExhaustedError: it would create a topic or groups past the caps; nothing is created.
        """
        subscription = Subscription(self, settings)
        if topics.is_pattern(settings.topic):
            matching = [name for name in sorted(self._known_topics) if topics.matches(settings.topic, name)]
        else:
            matching = [settings.topic]
        reservation = await self.caps.admit_subscription(settings, matching)
        try:
            for name in matching:
                await self._attach(subscription, name, fresh_topic=False)
            self._subscriptions.add(subscription)
        finally:
            self.caps.release(reservation)
        if self.node_link is not None:
            await self.node_link.announce(settings.topic)
        return subscription

    async def _attach_patterns(self, topic: str) -> None:
        for subscription in list(self._subscriptions):
            if (
                not subscription.closed
                and topic not in subscription.groups
                and topics.is_pattern(subscription.settings.topic)
                and topics.matches(subscription.settings.topic, topic)
            ):
                await self._attach(subscription, topic, fresh_topic=True)

    async def _attach(self, subscription: Subscription, topic: str, *, fresh_topic: bool) -> None:
        settings = subscription.settings
        if settings.broadcast:
            floor = await self._start_floor(topic, settings, fresh_topic)
            ephemeral = GroupRuntime(
                broker=self,
                topic=topic,
                name=f"_broadcast-{subscription.id}",
                durable=False,
                state=GroupState(ack_floor=floor, group=f"_broadcast-{subscription.id}"),
            )
            self._groups[(topic, ephemeral.name)] = ephemeral
            ephemeral.attach(subscription)
            return
        key = (topic, settings.group)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            runtime = self._groups.get(key)
            if runtime is None and isinstance(self.store, NativeGroupStore):
                runtime = await self._open_native(topic, settings, fresh_topic)
                self._groups[key] = runtime
            elif runtime is None:
                record = await self.store.load_group(topic, settings.group)
                if record is None:
                    floor = await self._start_floor(topic, settings, fresh_topic)
                    record = GroupRecord(topic=topic, name=settings.group, ack_floor=floor)
                    await self.store.save_group(record)
                    self._known_topics.add(topic)
                state = GroupState(
                    ack_floor=record.ack_floor,
                    acked_above_floor=record.acked_above_floor,
                    attempts=record.attempts,
                    group=settings.group,
                )
                first = await self._first_sequence(topic)
                state.skip_to(first)
                runtime = GroupRuntime(
                    broker=self, topic=topic, name=settings.group, durable=True, state=state
                )
                self._groups[key] = runtime
            self.caps.group_exists(topic, settings.group)
            runtime.attach(subscription)

    async def _open_native(
        self, topic: str, settings: SubscriptionSettings, fresh_topic: bool
    ) -> ConsumerGroupRuntime:
        assert isinstance(self.store, NativeGroupStore)
        start: int | None = None
        if fresh_topic or settings.start.kind != "new_only":
            start = await self._start_floor(topic, settings, fresh_topic) + 1
        holder: list[ConsumerGroupRuntime] = []

        def wake() -> None:
            if holder:
                holder[0].wake.set()

        consumer = await self.store.open_group_consumer(topic, settings.group, settings.policy, start, wake)
        runtime = ConsumerGroupRuntime(self, topic, settings.group, consumer)
        holder.append(runtime)
        self._known_topics.add(topic)
        return runtime

    async def _first_sequence(self, topic: str) -> int:
        stats = await self.store.get_topic(topic)
        return stats.first_sequence if stats is not None else 1

    async def _start_floor(self, topic: str, settings: SubscriptionSettings, fresh_topic: bool) -> int:
        """The ack floor of a new group: everything before the start position counts as done."""
        last = self.store.last_sequence(topic)
        start = settings.start
        if fresh_topic or start.kind == "earliest":
            first = await self._first_sequence(topic)
            return max(0, first - 1)
        if start.kind == "sequence":
            if start.sequence > last + 1:
                raise OutOfRangeError(
                    f"open.start.sequence: {start.sequence} is beyond the end of {topic!r} (last {last})"
                )
            return start.sequence - 1
        if start.kind == "time":
            return await self.store.sequence_at(topic, start.time_ns) - 1
        return last

    async def _retire(self, runtime: GroupRunner) -> None:
        """The last member left: persist and stop the dispatcher."""
        key = (runtime.topic, runtime.name)
        if self._groups.get(key) is runtime and not runtime.members:
            del self._groups[key]
            # Runs to its end even when the Subscribe call that left is cancelled.
            task = asyncio.create_task(runtime.close())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            await asyncio.shield(task)

    # -- persistence -----------------------------------------------------------------

    async def _flush(self) -> None:
        for runtime in list(self._groups.values()):
            if not isinstance(runtime, GroupRuntime):
                continue
            # A dead message holds the floor until its dead letter is stored (GroupState.buried).
            if runtime.durable and runtime.dirty:
                runtime.dirty = False
                try:
                    await self.store.save_group(runtime.record())
                except Exception:
                    runtime.dirty = True
                    logger.exception("saving group %s/%s failed", runtime.topic, runtime.name)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await self._flush()

    async def _lag_loop(self) -> None:
        while True:
            await asyncio.sleep(LAG_INTERVAL)
            metrics = get_telemetry().metrics
            if not metrics.enabled:
                continue
            for (topic, name), runtime in list(self._groups.items()):
                if not runtime.durable:
                    continue
                try:
                    info = await self.describe_group(topic, name)
                except Exception:
                    logger.debug("lag of %s/%s unavailable", topic, name, exc_info=True)
                    continue
                if info is not None:
                    metrics.set_consumer_lag(topic, name, int(info.pending))

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(RETENTION_INTERVAL)
            try:
                await self.store.enforce_retention(time.time_ns())
            except Exception:
                logger.exception("retention sweep failed")

    # -- request/reply ---------------------------------------------------------------

    async def request(self, topic: str, message: bus_pb2.BusMessage, within: float) -> bus_pb2.BusMessage:
        """Publish ``message`` with reply routing and wait for the first reply."""
        link = self.node_link
        if not self.has_subscribers(topic) and not (link is not None and await link.anyone_subscribed(topic)):
            raise UnavailableError(f"no responders on topic {topic!r}")
        correlation_id = uuid.uuid4().hex
        message.correlation_id = correlation_id
        message.reply_to = self.reply_address
        future: asyncio.Future[bus_pb2.BusMessage] = asyncio.get_running_loop().create_future()
        self._requests[correlation_id] = future
        try:
            async with asyncio.timeout(within):
                await self.publish(topic, [message])
                return await future
        except TimeoutError:
            raise DeadlineExceededError(f"no reply on {topic!r} within {within:g} s") from None
        finally:
            self._requests.pop(correlation_id, None)

    async def reply(self, reply_to: str, correlation_id: str, message: bus_pb2.BusMessage) -> bool:
        """Complete the waiting request; False when it finished already (the reply is dropped).

        A request held by another Bus node on the same NATS gets the reply forwarded.
        """
        message.correlation_id = correlation_id
        if reply_to == self.reply_address:
            return self._take_reply(message)
        link = self.node_link
        node = reply_to.removeprefix("_reply.")
        if link is None or node == reply_to or not topics.is_plain_token(node):
            return False
        return await link.forward_reply(node, message)

    def _take_reply(self, message: bus_pb2.BusMessage) -> bool:
        future = self._requests.get(message.correlation_id)
        if future is None or future.done():
            return False
        future.set_result(message)
        return True
