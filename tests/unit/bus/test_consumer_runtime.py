"""The runtime of a group served from a backend consumer, with an in-memory consumer and broker."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rpcmesh.v1 import bus_pb2

from rpcmesh.controlplane.bus.consumer_ledger import Fetched
from rpcmesh.controlplane.bus.consumer_runtime import ConsumerGroupRuntime
from rpcmesh.controlplane.bus.group_state import Dead, DeliveryPolicy


@dataclass
class MemoryConsumer:
    policy: DeliveryPolicy
    pending: list[Fetched] = field(default_factory=list)
    settled: list[tuple[str, Any, float | None]] = field(default_factory=list)
    closed: bool = False

    async def pull(self, room: int) -> None:
        pass

    def pull_deadline(self) -> float | None:
        return None

    def arrivals(self) -> list[Fetched]:
        arrived, self.pending = self.pending, []
        return arrived

    async def settle(self, actions: Sequence[tuple[str, Any, float | None]]) -> None:
        self.settled.extend(actions)

    async def describe(self) -> bus_pb2.ConsumerGroupInfo:
        return bus_pb2.ConsumerGroupInfo()

    async def close(self, returned: Sequence[Any] = ()) -> None:
        self.settled.extend(("nak", handle, None) for handle in returned)
        self.closed = True


class MemoryBroker:
    def __init__(self) -> None:
        self.now = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self.dead: list[Dead] = []

    def clock(self) -> float:
        return self.now

    async def dead_letter(self, topic: str, group: str, dead: Sequence[Dead]) -> None:
        self.dead.extend(dead)

    async def _retire(self, runtime: ConsumerGroupRuntime) -> None:
        await runtime.close()


@dataclass
class Settings:
    max_batch: int = 10
    max_in_flight: int = 10


class Member:
    def __init__(self) -> None:
        self.settings = Settings()
        self.groups: dict[str, Any] = {}
        self.got: list[tuple[int, int]] = []

    @property
    def capacity(self) -> int:
        return self.settings.max_in_flight - sum(g.held_by(self) for g in self.groups.values())

    def deliver(self, topic: str, group: str, entries: Sequence[Fetched]) -> None:
        self.got.extend((e.sequence, e.attempts) for e in entries)


def fetched(seq: int, attempts: int = 1) -> Fetched:
    return Fetched(message=bus_pb2.BusMessage(sequence=seq), attempts=attempts, handle=f"h{seq}.{attempts}")


async def settle_down() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def started(
    policy: DeliveryPolicy,
) -> tuple[ConsumerGroupRuntime, MemoryConsumer, MemoryBroker, Member]:
    consumer = MemoryConsumer(policy=policy)
    broker = MemoryBroker()
    runtime = ConsumerGroupRuntime(broker, "t", "g", consumer)  # type: ignore[arg-type]
    member = Member()
    runtime.attach(member)  # type: ignore[arg-type]
    return runtime, consumer, broker, member


async def test_deliveries_acks_and_over_delivered_messages() -> None:
    runtime, consumer, broker, member = await started(DeliveryPolicy(max_deliveries=2))
    consumer.pending += [fetched(1), fetched(2, attempts=3)]
    runtime.wake.set()
    await settle_down()
    assert member.got == [(1, 1)]
    assert [(d.message.sequence, d.attempts, d.reason) for d in broker.dead] == [(2, 2, "max_deliveries")]
    runtime.ack(1)
    await settle_down()
    assert ("ack", "h1.1", None) in consumer.settled and ("term", "h2.3", None) in consumer.settled
    await runtime.detach(member)  # type: ignore[arg-type]
    assert consumer.closed


async def test_nak_uses_the_backoff_or_dead_letters_the_last_attempt() -> None:
    runtime, consumer, broker, member = await started(
        DeliveryPolicy(max_deliveries=2, redelivery_backoff=0.5)
    )
    consumer.pending += [fetched(1), fetched(2, attempts=2)]
    runtime.wake.set()
    await settle_down()
    runtime.nak(1, None)
    runtime.nak(2, 0.1)
    await settle_down()
    assert ("nak", "h1.1", 0.5) in consumer.settled
    assert [d.message.sequence for d in broker.dead] == [2] and ("term", "h2.2", None) in consumer.settled
    runtime.term(99, "unknown sequences are ignored")
    await runtime.detach(member)  # type: ignore[arg-type]


async def test_a_leaving_member_returns_its_messages_and_late_acks_still_count() -> None:
    runtime, consumer, broker, member = await started(DeliveryPolicy(ack_deadline=1.0))
    consumer.pending += [fetched(1), fetched(2)]
    runtime.wake.set()
    await settle_down()
    broker.now = 2.0  # past the deadline: forgotten locally, JetStream will redeliver
    runtime.wake.set()
    await settle_down()
    runtime.ack(1)  # late, but before the redelivery: forwarded
    await settle_down()
    assert ("ack", "h1.1", None) in consumer.settled
    consumer.pending.append(fetched(2, attempts=2))
    runtime.wake.set()
    await settle_down()
    assert member.got[-1] == (2, 2)
    await runtime.detach(member)  # type: ignore[arg-type]
    assert ("nak", "h2.2", None) in consumer.settled and consumer.closed
