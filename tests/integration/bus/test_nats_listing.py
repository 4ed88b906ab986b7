"""The Bus on NATS sees every topic and dead letter, whatever this node saw and however loaded NATS is.

Three ways a node answered "nothing" while JetStream held the data (a replay retried after a crash
then replayed nothing, and the dead letters were gone for the operator):

* JetStream lists streams 256 a page; a node that started with more streams on the server (every
  topic and every dead-letter topic is one) knew only the first page of topics.
* a dead-letter topic first written through another node (or after this node started) was unknown
  to this node's cache, and reads of an unknown topic answered nothing.
* a reader's fetch that timed out (a loaded or briefly stalled server) was taken for "no messages".

Real control planes on the machine's NATS JetStream; the stall goes through a relay that stops
relaying (:class:`~tests.support.tcp_proxy.FreezableProxy`) for a seeded random time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import grpc.aio
import nats
import pytest
from nats.js import api
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc

from rpcmesh.controlplane.bus.component import BusComponent
from rpcmesh.controlplane.bus.nats_store import NatsBusStore
from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.controlplane.server import ControlPlane
from tests.integration.bus.streams import RawSubscriber, options
from tests.support import backends
from tests.support.tcp_proxy import FreezableProxy

pytestmark = [pytest.mark.backend]

T = TypeVar("T")
SEED = int(os.environ.get("RPCMESH_FAULT_SEED", random.randrange(1 << 30)))
DEAD = 7
PADDING = 300
"""Streams that sort before the Bus's own (``RMA_`` < ``RMB_``): more than one page of 256."""


@contextlib.asynccontextmanager
async def bus_node(data: Path) -> AsyncIterator[bus_pb2_grpc.BusStub]:
    """A Bus node on the machine's NATS, in-process on a free port."""
    config = ControlPlaneConfig(port=0, data_dir=data, bus=backends.nats_url(), grace=0.5)
    plane = ControlPlane(config, components=[BusComponent(config)])
    address = await plane.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            yield bus_pb2_grpc.BusStub(channel)
    finally:
        await plane.stop()


@pytest.fixture
async def padding() -> AsyncIterator[None]:
    """PADDING small streams ahead of the Bus's in JetStream's listing, deleted afterwards."""
    nc = await nats.connect(backends.nats_url())
    js = nc.jetstream()
    tag = uuid.uuid4().hex[:8]
    names = [f"RMA_PAD_{tag}_{i:03d}" for i in range(PADDING)]
    try:
        for index, name in enumerate(names):
            await js.add_stream(
                api.StreamConfig(name=name, subjects=[f"pad.{tag}.{index}"], storage=api.StorageType.MEMORY)
            )
        yield
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
        await nc.close()


async def bury(stub: bus_pb2_grpc.BusStub, topic: str) -> None:
    """DEAD messages on ``topic``, all terminated by group g (dead letters); waits until listed."""
    messages = [bus_pb2.BusMessage(id=f"m{i}", payload=str(i).encode()) for i in range(DEAD)]
    await stub.Publish(bus_pb2.PublishRequest(topic=topic, messages=messages))
    sub = RawSubscriber(stub, options(topic, "g"))
    try:
        await sub.opened()
        sub.term(await sub.receive(DEAD), "poison")
        for _ in range(100):
            if len(await listed(stub, topic)) == DEAD:
                return
            await asyncio.sleep(0.05)
    finally:
        await sub.close()
    raise AssertionError(f"only {len(await listed(stub, topic))} dead letters")


async def listed(stub: bus_pb2_grpc.BusStub, topic: str) -> list[int]:
    """The payloads of the topic's dead letters for group g, over every page (of 2)."""
    payloads: list[int] = []
    token = ""
    while True:
        page = await stub.ListDeadLetters(
            bus_pb2.ListDeadLettersRequest(topic=topic, group="g", page_size=2, page_token=token)
        )
        payloads += [int(letter.message.payload) for letter in page.dead_letters]
        token = page.next_page_token
        if not token:
            return payloads


async def replay_and_receive(stub: bus_pb2_grpc.BusStub, topic: str) -> list[int]:
    """Replay every dead letter into g; the payloads g then receives."""
    replayed = await stub.ReplayDeadLetters(bus_pb2.ReplayDeadLettersRequest(topic=topic, group="g"))
    assert replayed.replayed == DEAD
    sub = RawSubscriber(stub, options(topic, "g"))
    try:
        await sub.opened()
        got = await sub.receive(DEAD)
        sub.ack(got)
        await asyncio.sleep(0.2)
        return sorted(int(d.message.payload) for d in got)
    finally:
        await sub.close()


@pytest.mark.usefixtures("padding")
async def test_a_restarted_node_sees_topics_and_dead_letters_past_the_first_page(
    tmp_path: Path, prefix: str
) -> None:
    topic = f"{prefix}.orders"
    async with bus_node(tmp_path / "a") as stub:
        await bury(stub, topic)
    async with bus_node(tmp_path / "b") as stub:
        names: list[str] = []
        token = ""
        while True:
            page = await stub.ListTopics(bus_pb2.ListTopicsRequest(page_size=100, page_token=token))
            names += [t.name for t in page.topics]
            token = page.next_page_token
            if not token:
                break
        assert topic in names
        assert sorted(await listed(stub, topic)) == list(range(DEAD))
        assert await replay_and_receive(stub, topic) == list(range(DEAD))
        assert await listed(stub, topic) == []


async def test_dead_letters_buried_through_another_node_are_listed_and_replayed(
    tmp_path: Path, prefix: str
) -> None:
    topic = f"{prefix}.orders"
    async with bus_node(tmp_path / "a") as stub_a, bus_node(tmp_path / "b") as stub_b:
        await bury(stub_a, topic)
        assert sorted(await listed(stub_b, topic)) == list(range(DEAD))
        assert await replay_and_receive(stub_b, topic) == list(range(DEAD))
        assert await listed(stub_a, topic) == []


PULL = b"CONSUMER.MSG.NEXT"
"""The bytes of a JetStream pull request: the stall starts exactly when a fetch asks."""


@contextlib.asynccontextmanager
async def stalling_store() -> AsyncIterator[tuple[NatsBusStore, FreezableProxy]]:
    """A Bus store whose connection to the machine's NATS goes through a freezable relay."""
    target = urlsplit(backends.nats_url())
    proxy = FreezableProxy(target.hostname or "127.0.0.1", target.port or 4222)
    await proxy.start()
    store = NatsBusStore(proxy.url)
    await store.open()
    try:
        yield store, proxy
    finally:
        proxy.thaw()
        await store.close()
        await proxy.close()


async def stalled(proxy: FreezableProxy, operation: Awaitable[T], stall: float) -> T:
    """Run ``operation``, freezing the relay at its next pull request for ``stall`` seconds."""
    proxy.freeze_on(PULL)
    running = asyncio.ensure_future(operation)
    await asyncio.wait_for(proxy.triggered.wait(), 10)
    await asyncio.sleep(stall)
    proxy.thaw()
    return await running


async def test_a_read_stalled_past_its_fetch_timeout_still_finds_the_stored_messages(prefix: str) -> None:
    rand = random.Random(SEED)
    async with stalling_store() as (store, proxy):
        for trial in range(5):
            topic = f"{prefix}.stall{trial}"
            count = rand.randint(3, 40)
            await store.append(topic, [bus_pb2.BusMessage(payload=b"%d" % i) for i in range(count)])
            first, _ = await store.read(topic, 1, 1)  # leaves a reader positioned at 2
            assert [m.sequence for m in first] == [1]
            stall = rand.uniform(0.4, 1.5)
            messages, through = await stalled(proxy, store.read(topic, 2, 100), stall)
            where = f"(seed {SEED}, trial {trial}, stall {stall:.2f} s)"
            got = [m.sequence for m in messages]
            assert got and got == list(range(2, 2 + len(got))), f"read {got} {where}"
            assert through == got[-1], where
            rest: list[int] = []
            while through < count:
                more, through = await store.read(topic, through + 1, 100)
                rest += [m.sequence for m in more]
            assert got + rest == list(range(2, count + 1)), where
            # A range whose messages are all deleted is skipped, not read again and again.
            await store.delete_messages(topic, list(range(2, count + 1)))
            assert await store.read(topic, 2, 100) == ([], count), where


async def test_a_start_time_looked_up_during_a_stall_does_not_skip_messages(prefix: str) -> None:
    rand = random.Random(SEED + 1)
    async with stalling_store() as (store, proxy):
        for trial in range(4):
            topic = f"{prefix}.since{trial}"
            before = rand.randint(1, 10)
            await store.append(topic, [bus_pb2.BusMessage(payload=b"old") for _ in range(before)])
            await asyncio.sleep(0.05)
            since = time.time_ns()
            await asyncio.sleep(0.05)
            await store.append(
                topic, [bus_pb2.BusMessage(payload=b"new") for _ in range(rand.randint(1, 10))]
            )
            stall = rand.uniform(0.7, 1.5)  # past the first fetch's 0.5 s
            where = f"(seed {SEED + 1}, trial {trial}, stall {stall:.2f} s)"
            assert await stalled(proxy, store.sequence_at(topic, since), stall) == before + 1, where
            # Nothing published since: the sequence after the last, found through a stall too.
            later = time.time_ns()
            assert (
                await stalled(proxy, store.sequence_at(topic, later), stall) == store.last_sequence(topic) + 1
            )
