"""A failed dead-letter write loses nothing (SQLite broker, faults injected through the store).

The store is the real :class:`SqliteBusStore`; a subclass refuses appends to
``$dlq.`` topics a number of times. The dead message may only pass the group's
persisted ack floor once its dead letter is stored: with a few failures the
broker retries until it is; with a store that never takes it, the message is
still below the floor after a restart and is delivered again.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from rpcmesh.v1 import bus_pb2

from rpcmesh.controlplane.bus.broker import Broker
from rpcmesh.controlplane.bus.group_runtime import Subscription
from rpcmesh.controlplane.bus.sqlite_store import SqliteBusStore
from rpcmesh.controlplane.bus.store import AppendResult
from rpcmesh.controlplane.bus.topics import DEAD_LETTER_PREFIX, dead_letter_topic
from rpcmesh.controlplane.bus.validation import BusLimits, subscription_settings
from tests.integration.bus.streams import options

TOPIC = "orders"
GROUP = "lazy"
SEED = int(os.environ.get("RPCMESH_DLQ_FAULT_SEED", random.randrange(1 << 30)))


class FailingDeadLetterStore(SqliteBusStore):
    """SQLite, except that the next ``failures`` dead-letter appends raise."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures
        self.refused = 0

    async def append(
        self, topic: str, messages: Sequence[bus_pb2.BusMessage], *, dedup: bool = True
    ) -> list[AppendResult]:
        if topic.startswith(DEAD_LETTER_PREFIX + ".") and self.failures != 0:
            self.failures -= 1
            self.refused += 1
            raise OSError("injected: dead-letter write failed")
        return await super().append(topic, messages, dedup=dedup)


async def first_delivery(sub: Subscription) -> bus_pb2.Delivery:
    batch = await asyncio.wait_for(sub.outbox.get(), 10)
    assert batch
    return batch[0]


async def kill_one(broker: Broker) -> Subscription:
    """Publish one message and terminate its first delivery (it becomes dead)."""
    await broker.publish(TOPIC, [bus_pb2.BusMessage(id="poison", payload=b"p")])
    sub = await broker.subscribe(subscription_settings(options(TOPIC, GROUP), BusLimits()))
    delivery = await first_delivery(sub)
    sub.term([bus_pb2.MessageRef(topic=TOPIC, sequence=delivery.message.sequence)], "bad")
    return sub


async def test_dead_letter_write_is_retried_before_the_floor_passes(tmp_path: Path) -> None:
    failures = random.Random(SEED).randint(1, 4)
    store = FailingDeadLetterStore(tmp_path / "bus.db", failures)
    broker = Broker(store)
    await broker.start()
    try:
        sub = await kill_one(broker)
        dead_topic = dead_letter_topic(TOPIC, GROUP)
        for _ in range(200):
            stats = await store.get_topic(dead_topic)
            if stats is not None and stats.message_count:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"seed {SEED}: the dead letter was never stored ({failures} failures)")
        assert store.refused == failures, f"seed {SEED}"
        await sub.close()
    finally:
        await broker.stop()
    record = await reopened_record(tmp_path)
    assert record == (1, 1), f"seed {SEED}: (floor, dead letters) = {record}"


async def test_a_dead_letter_never_stored_keeps_the_message(tmp_path: Path) -> None:
    store = FailingDeadLetterStore(tmp_path / "bus.db", -1)  # refuses every time
    broker = Broker(store)
    await broker.start()
    try:
        sub = await kill_one(broker)
        for _ in range(250):  # until the first write and one retry failed
            if store.refused >= 2:
                break
            await asyncio.sleep(0.02)
        assert store.refused >= 2, "the failed dead-letter write was not retried"
        await asyncio.sleep(0.2)  # several flushes of the group's progress
        await sub.close()
    finally:
        await broker.stop()
    assert await reopened_record(tmp_path) == (0, 0)
    # After the restart the message is delivered again: nothing was lost.
    broker = Broker(SqliteBusStore(tmp_path / "bus.db"))
    await broker.start()
    try:
        sub = await broker.subscribe(subscription_settings(options(TOPIC, GROUP), BusLimits()))
        delivery = await first_delivery(sub)
        assert delivery.message.id == "poison"
        await sub.close()
    finally:
        await broker.stop()


async def reopened_record(tmp_path: Path) -> tuple[int, int]:
    """The group's persisted ack floor and its stored dead letters, read with a fresh store."""
    store = SqliteBusStore(tmp_path / "bus.db")
    await store.open()
    try:
        record = await store.load_group(TOPIC, GROUP)
        assert record is not None
        stats = await store.get_topic(dead_letter_topic(TOPIC, GROUP))
        return record.ack_floor, stats.message_count if stats is not None else 0
    finally:
        await store.close()


pytestmark = pytest.mark.timeout(60)
