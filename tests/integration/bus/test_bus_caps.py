"""Caps on topics and consumer groups: every creating path answers RESOURCE_EXHAUSTED past them.

A real Bus (ControlPlane + BusComponent on a grpc.aio server on port 0) on SQLite
and on NATS JetStream, driven over gRPC without authentication, as the flood of
the security issue was. On the shared NATS server other suites' streams exist, so
each test sets its caps relative to what its Bus counted at start.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc

from rpcmesh.controlplane.bus.caps import BusCaps, CapLedger
from rpcmesh.controlplane.bus.component import BusComponent
from rpcmesh.controlplane.bus.nats_store import NatsBusStore
from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.controlplane.server import ControlPlane
from tests.integration.bus.streams import RawSubscriber, options
from tests.support import backends
from tests.support.streams import stream_status


@dataclass
class CappedBus:
    stub: bus_pb2_grpc.BusStub
    ledger: CapLedger
    prefix: str

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def cap(self, *, topics: int, groups: int) -> None:
        """Allow ``topics`` and ``groups`` more than the Bus counts now."""
        self.ledger.caps = BusCaps(
            max_topics=self.ledger.topic_count + topics, max_groups=self.ledger.group_count + groups
        )

    async def names(self) -> set[str]:
        names: set[str] = set()
        token = ""
        while True:
            page = await self.stub.ListTopics(bus_pb2.ListTopicsRequest(page_size=1000, page_token=token))
            names.update(t.name for t in page.topics if t.name.startswith(self.prefix + "."))
            token = page.next_page_token
            if not token:
                return names

    async def groups(self, topic: str) -> set[str]:
        info = (await self.stub.GetTopic(bus_pb2.GetTopicRequest(name=topic))).topic
        return {group.name for group in info.groups}


@pytest.fixture(params=["sqlite", pytest.param("nats", marks=pytest.mark.backend)])
async def capped(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CappedBus]:
    nats = backends.nats_url() if request.param == "nats" else None
    config = ControlPlaneConfig(port=0, data_dir=tmp_path / "data", bus=nats, grace=0.5)
    component = BusComponent(config)
    plane = ControlPlane(config, components=[component])
    address = await plane.start()
    channel = grpc.aio.insecure_channel(address)
    prefix = f"cap{uuid.uuid4().hex[:10]}"
    try:
        yield CappedBus(bus_pb2_grpc.BusStub(channel), component.broker.caps, prefix)
    finally:
        await channel.close()
        await plane.stop()
        if nats is not None:
            cleaner = NatsBusStore(nats)
            await cleaner.open()
            try:
                await cleaner.purge_prefix(prefix)
            finally:
                await cleaner.close()


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def subscribe(bus: CappedBus, opts: bus_pb2.SubscriptionOptions) -> RawSubscriber:
    sub = RawSubscriber(bus.stub, opts)
    try:
        await sub.opened()
    except BaseException:
        await sub.close()
        raise
    return sub


def publish(bus: CappedBus, topic: str) -> object:
    return bus.stub.Publish(bus_pb2.PublishRequest(topic=topic, messages=[bus_pb2.BusMessage(payload=b"x")]))


async def test_topic_cap_refuses_every_creating_path_and_creates_nothing(capped: CappedBus) -> None:
    bus = capped
    bus.cap(topics=2, groups=100)
    await bus.stub.CreateTopic(bus_pb2.CreateTopicRequest(name=bus.topic("one")))
    await publish(bus, bus.topic("two"))
    full = bus.topic("three")

    error = await refused(bus.stub.CreateTopic(bus_pb2.CreateTopicRequest(name=full)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_topics" in (error.details() or "") and full in (error.details() or "")
    assert (await refused(publish(bus, full))).code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # Without a half-close, which could race the server's refusal (see tests.support.streams).
    batch = bus_pb2.PublishStreamRequest(topic=full, batch_id=1, messages=[bus_pb2.BusMessage(payload=b"x")])
    assert await stream_status(bus.stub.PublishStream, batch) == grpc.StatusCode.RESOURCE_EXHAUSTED
    event = bus_pb2.PublishEventRequest(event_type=f"{bus.prefix}-flood", data=b"x")
    assert (await refused(bus.stub.PublishEvent(event))).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await subscribe(bus, options(full, "g"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    assert await bus.names() == {bus.topic("one"), bus.topic("two")}
    assert (await refused(bus.stub.GetTopic(bus_pb2.GetTopicRequest(name=full)))).code() == (
        grpc.StatusCode.NOT_FOUND
    )
    # Existing topics go on working, and deleting one makes room.
    await publish(bus, bus.topic("one"))
    await bus.stub.CreateTopic(bus_pb2.CreateTopicRequest(name=bus.topic("one")))
    await bus.stub.DeleteTopic(bus_pb2.DeleteTopicRequest(name=bus.topic("two")))
    await publish(bus, full)
    assert await bus.names() == {bus.topic("one"), full}


async def test_group_cap_refuses_new_groups_and_pattern_joins(capped: CappedBus) -> None:
    bus = capped
    one, two = bus.topic("one"), bus.topic("two")
    for topic in (one, two):
        await bus.stub.CreateTopic(bus_pb2.CreateTopicRequest(name=topic))
    bus.cap(topics=10, groups=2)
    first = await subscribe(bus, options(one, "g1"))
    second = await subscribe(bus, options(two, "g1"))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await subscribe(bus, options(one, "g2"))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_groups" in (info.value.details() or "")
        # A pattern subscription that would make groups on both topics: refused whole.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await subscribe(bus, options(f"{bus.prefix}.*", "g3"))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Joining an existing group, and broadcast (no durable group), still work.
        again = await subscribe(bus, options(one, "g1"))
        await again.close()
        watcher = await subscribe(bus, options(one, broadcast=True))
        await watcher.close()
        assert await bus.groups(one) == {"g1"} and await bus.groups(two) == {"g1"}
        # A pattern subscriber's group on a new topic counts too: the publish that would
        # create it is refused before anything is stored.
        bus.cap(topics=10, groups=2)  # room for the pattern's groups on the two topics only
        pattern = await subscribe(bus, options(f"{bus.prefix}.>", "p"))
        try:
            three = bus.topic("three")
            assert (await refused(publish(bus, three))).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert three not in await bus.names()
        finally:
            await pattern.close()
    finally:
        await first.close()
        await second.close()


async def create_one(bus: CappedBus, kind: str, topic: str, group: str, delay: float) -> RawSubscriber | str:
    """One creating call after ``delay``: its subscriber, "ok", or "refused" (RESOURCE_EXHAUSTED)."""
    await asyncio.sleep(delay)
    try:
        if kind == "create":
            await bus.stub.CreateTopic(bus_pb2.CreateTopicRequest(name=topic))
        elif kind == "publish":
            await publish(bus, topic)
        else:
            return await subscribe(bus, options(topic, group))
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return "refused"
    return "ok"


@pytest.mark.fault
async def test_concurrent_flood_never_passes_the_caps(capped: CappedBus) -> None:
    """Seeded floods of concurrent creations, in random order and kinds, over several trials."""
    bus = capped
    for seed in range(6):
        rng = random.Random(seed)
        topic_room, group_room = rng.randint(1, 6), rng.randint(1, 6)
        bus.cap(topics=topic_room, groups=group_room)
        before_topics = await bus.names()
        names = [bus.topic(f"s{seed}-t{index}") for index in range(rng.randint(8, 16))]
        kinds = [rng.choice(["create", "publish", "subscribe"]) for _ in range(24)]
        where = f"seed={seed} topic_room={topic_room} group_room={group_room} kinds={kinds}"

        groups_before = bus.ledger.group_count
        results: list[RawSubscriber | str | BaseException] = []
        try:
            results = await asyncio.gather(
                *(
                    create_one(bus, kind, rng.choice(names), f"g{rng.randint(1, 3)}", rng.random() * 0.02)
                    for kind in kinds
                ),
                return_exceptions=True,
            )
            errors = [result for result in results if isinstance(result, BaseException)]
            assert not errors, f"{where}: {errors}"
            outcomes = ["ok" if isinstance(result, RawSubscriber) else result for result in results]
            created = await bus.names() - before_topics
            ours = {name for name in created if name.startswith(bus.topic(f"s{seed}-"))}
            assert len(ours) <= topic_room, f"{where}: {sorted(created)}"
            assert "ok" in outcomes, where
            assert bus.ledger.group_count - groups_before <= group_room, where
            groups = 0
            for name in ours:
                groups += len(await bus.groups(name))
            assert groups <= group_room, f"{where}: {groups} groups"
        finally:
            for result in results:
                if isinstance(result, RawSubscriber):
                    await result.close()


async def test_rpcmesh_up_flags_set_the_caps(tmp_path: Path) -> None:
    from tests.support.processes import start_control_plane

    proc, address = start_control_plane(tmp_path / "data", "--bus-max-topics", "2", "--bus-max-groups", "1")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = bus_pb2_grpc.BusStub(channel)
            for name in ("capped.a", "capped.b"):
                await stub.CreateTopic(bus_pb2.CreateTopicRequest(name=name), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateTopic(bus_pb2.CreateTopicRequest(name="capped.c"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_topics" in (caught.value.details() or "")
            listed = await stub.ListTopics(bus_pb2.ListTopicsRequest(), timeout=10)
            assert sorted(topic.name for topic in listed.topics if not topic.name.startswith("$")) == [
                "capped.a",
                "capped.b",
            ]
    finally:
        proc.kill()
