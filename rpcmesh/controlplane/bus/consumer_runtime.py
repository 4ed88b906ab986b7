"""A consumer group served from a backend-kept consumer (JetStream) on this Bus node.

The counterpart of :class:`~rpcmesh.controlplane.bus.group_runtime.GroupRuntime` for a
:class:`~rpcmesh.controlplane.bus.store.NativeGroupStore`: the backend decides
deliveries and redeliveries and counts attempts; this runtime pulls as much as
its members have room for, hands messages out (keeping per-key order among its
members, :mod:`consumer_ledger`), and reports acks, naks and terms back.

Dead letters: a nak or term of a message that used up its deliveries, and a
message the backend delivers once more than ``max_deliveries`` (the deadline of
its last attempt passed, see :mod:`consumer_policy`), are published to
``$dlq.<topic>.<group>`` and then terminated in the backend. The dead letter's
id is derived from the topic, group and sequence, so a crash between the two
steps stores it once (within the deduplication window).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rpcmesh.controlplane.bus import topics
from rpcmesh.controlplane.bus.consumer_ledger import ConsumerLedger, Fetched
from rpcmesh.controlplane.bus.consumer_policy import over_delivered
from rpcmesh.controlplane.bus.group_state import DEADLINE_PASSED, Dead, DeliveryPolicy
from rpcmesh.controlplane.bus.redelivery import exhausted, redelivery_delay
from rpcmesh.controlplane.bus.store import GroupConsumer
from rpcmesh.tasks import stop_tasks
from rpcmesh.v1 import bus_pb2

if TYPE_CHECKING:
    from rpcmesh.controlplane.bus.broker import Broker
    from rpcmesh.controlplane.bus.group_runtime import Subscription

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.5
"""Longest the dispatcher sleeps without a wake-up."""

MAX_LATE = 10_000
"""Deliveries past their local deadline whose late ack is still forwarded (oldest dropped first)."""


class ConsumerGroupRuntime:
    """A group on a topic with members on this node, fed by a :class:`GroupConsumer`."""

    durable = True

    def __init__(self, broker: Broker, topic: str, name: str, consumer: GroupConsumer) -> None:
        self.broker = broker
        self.topic = topic
        self.name = name
        self.consumer = consumer
        self.ledger = ConsumerLedger()
        self.members: list[Subscription] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.burying = 0
        self._actions: list[tuple[str, Any, float | None]] = []
        self._leftover: list[Any] = []
        self._late: dict[int, Any] = {}
        """Handles of deliveries past their deadline: JetStream still takes an ack until it redelivers."""
        self._errors: dict[int, str] = {}
        """Last error of messages whose last delivery from this node failed (oldest dropped past MAX_LATE)."""
        self._turn = 0
        self._closed = False

    @property
    def policy(self) -> DeliveryPolicy:
        """The group's policy (as the backend's consumer was created with)."""
        return self.consumer.policy

    def _hold_for(self, attempts: int, delay: float | None = None) -> float:
        if delay is None:
            delay = redelivery_delay(max(1, attempts), self.policy.redelivery_backoff)
        return delay + self.policy.ack_deadline

    # -- members ---------------------------------------------------------------------

    def attach(self, member: Subscription) -> None:
        """Add a member and make sure the dispatcher runs."""
        self.members.append(member)
        member.groups[self.topic] = self
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._dispatch(), name=f"bus-consume-{self.topic}-{self.name}")
        self.wake.set()

    async def detach(self, member: Subscription) -> None:
        """Remove a member; its deliveries go back to the backend for redelivery.

        With other members left they are nakked at once (they come back to this
        node's pull and go to the others); when the last member leaves they are
        returned by :meth:`close`, after this node stops pulling.
        """
        if member in self.members:
            self.members.remove(member)
        now = self.broker.clock()
        gone = self.ledger.member_gone(member, now, self.policy.ack_deadline)
        if self.members:
            self._actions.extend(("nak", entry.handle, None) for entry in gone)
        else:
            self._leftover.extend(entry.handle for entry in gone)
        self.wake.set()
        if not self.members:
            await self.broker._retire(self)

    def held_by(self, member: Subscription) -> int:
        """In-flight deliveries of ``member``."""
        return self.ledger.held_by(member)

    # -- outcomes --------------------------------------------------------------------

    def _failed(self, seq: int, error: str) -> None:
        self._errors.pop(seq, None)
        self._errors[seq] = error
        if len(self._errors) > MAX_LATE:
            del self._errors[next(iter(self._errors))]

    def ack(self, seq: int) -> None:
        """Acknowledge in the backend (unknown ones are ignored)."""
        self._errors.pop(seq, None)
        entry = self.ledger.finish(seq)
        handle = entry.handle if entry is not None else self._late.pop(seq, None)
        if handle is not None:
            self._actions.append(("ack", handle, None))
            self.wake.set()

    def nak(self, seq: int, delay: float | None, error: str = "") -> None:
        """Redeliver after ``delay`` (None: the backoff), or dead-letter when deliveries are used up.

        ``error`` (why the delivery failed) is kept as the message's last error.
        """
        entry = self.ledger.in_flight.get(seq)
        if entry is None:
            return
        if exhausted(entry.attempts, self.policy.max_deliveries):
            self.ledger.finish(seq)
            self._errors.pop(seq, None)
            dead = Dead(
                message=entry.message, attempts=entry.attempts, reason="max_deliveries", last_error=error
            )
            self.bury([(entry, dead)])
            return
        self._failed(seq, error)
        if delay is None:
            delay = redelivery_delay(entry.attempts, self.policy.redelivery_backoff)
        self.ledger.release(seq, self.broker.clock(), self._hold_for(entry.attempts, delay))
        self._actions.append(("nak", entry.handle, delay))
        self.wake.set()

    def term(self, seq: int, reason: str) -> None:
        """Dead-letter at once."""
        entry = self.ledger.in_flight.get(seq)
        if entry is None:
            return
        self.ledger.finish(seq)
        dead = Dead(
            message=entry.message,
            attempts=entry.attempts,
            reason=reason or "terminated",
            last_error=self._errors.pop(seq, ""),
        )
        self.bury([(entry, dead)])

    def bury(self, items: Sequence[tuple[Fetched, Dead]]) -> None:
        """Publish dead letters, then terminate the messages in the backend."""
        self.burying += 1
        task = asyncio.create_task(self._bury(list(items)))
        self.broker._background.add(task)
        task.add_done_callback(self.broker._background.discard)

    async def _bury(self, items: list[tuple[Fetched, Dead]]) -> None:
        try:
            await self.broker.dead_letter(self.topic, self.name, [dead for _, dead in items])
            outcome = "term"
        except Exception:
            logger.exception("dead-lettering on %s/%s failed; returning the messages", self.topic, self.name)
            outcome = "nak"
        finally:
            self.burying -= 1
        await self.consumer.settle([(outcome, entry.handle, None) for entry, _ in items])

    async def describe(self) -> bus_pb2.ConsumerGroupInfo:
        """Live figures from the backend."""
        return await self.consumer.describe()

    async def close(self) -> None:
        """Stop pulling; messages held here go back to the backend at once."""
        if self._closed:
            return
        self._closed = True
        if self.task is not None:
            await stop_tasks([self.task])  # skips the current task; survives a swallowed cancel
        actions, self._actions = self._actions, []
        with contextlib.suppress(Exception):
            await self.consumer.settle(actions)
        returned, self._leftover = self._leftover, []
        returned.extend(entry.handle for entry in self.ledger.drain())
        returned.extend(entry.handle for entry in self.consumer.arrivals())
        await self.consumer.close(returned)

    # -- dispatching -----------------------------------------------------------------

    async def _dispatch(self) -> None:
        ledger = self.ledger
        try:
            while self.members:
                self.wake.clear()
                policy = self.policy
                now = self.broker.clock()
                for late in ledger.expire(now, self._hold_for(1)):
                    self._failed(late.sequence, DEADLINE_PASSED)
                    self._late[late.sequence] = late.handle
                    if len(self._late) > MAX_LATE:
                        del self._late[next(iter(self._late))]
                for entry in self.consumer.arrivals():
                    self._late.pop(entry.sequence, None)
                    if topics.skipped_by(entry.message.headers, self.name):
                        # A dead letter replayed into another group: done here, never delivered.
                        self._actions.append(("ack", entry.handle, None))
                        continue
                    if over_delivered(entry.attempts, policy.max_deliveries):
                        # Its last delivery was not acknowledged in time (JetStream redelivered it).
                        self._errors.pop(entry.sequence, None)
                        dead = Dead(
                            message=entry.message,
                            attempts=policy.max_deliveries,
                            reason="max_deliveries",
                            last_error=DEADLINE_PASSED,
                        )
                        self.bury([(entry, dead)])
                        continue
                    ledger.offer(entry, now)
                touch_every = max(0.05, policy.ack_deadline / 3)
                self._actions.extend(
                    ("touch", entry.handle, None) for entry in ledger.touch_due(now, touch_every)
                )
                sent = False
                count = len(self.members)
                room = 0
                for offset in range(count):
                    member = self.members[(self._turn + offset) % count]
                    space = min(member.capacity, member.settings.max_batch)
                    if space > 0 and ledger.has_ready():
                        entries = ledger.take(member, space, now, policy.ack_deadline)
                        if entries:
                            member.deliver(self.topic, self.name, entries)
                            sent = True
                    room += max(0, member.capacity)
                self._turn += 1
                await self.consumer.pull(room - ledger.buffered)
                if self._actions:
                    actions, self._actions = self._actions, []
                    await self.consumer.settle(actions)
                if sent:
                    await asyncio.sleep(0)
                    continue
                if self.wake.is_set():
                    continue
                timers = [t for t in (ledger.next_timer(), self.consumer.pull_deadline()) if t is not None]
                if ledger.buffered:
                    timers.append(now + touch_every)
                timeout = POLL_INTERVAL if not timers else max(0.0, min(POLL_INTERVAL, min(timers) - now))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("consumer dispatcher of %s/%s failed", self.topic, self.name)
