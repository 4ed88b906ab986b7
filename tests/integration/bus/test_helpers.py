"""The rpcmesh.bus client helpers against a real Bus (SQLite)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import grpc
import pytest
from rpcmesh.v1 import bus_pb2, common_pb2

from rpcmesh.bus import (
    Publisher,
    PublisherConfig,
    Received,
    Responder,
    Subscriber,
    SubscriberConfig,
    SyncPublisher,
    SyncSubscriber,
    Terminate,
    publish_event,
    request,
    request_sync,
)
from rpcmesh.errors import DeadlineExceededError, ResourceExhaustedError, UnavailableError
from rpcmesh.telemetry import correlation_id, use_correlation_id
from tests.integration.bus.conftest import BusHandle


async def test_publisher_batches_and_subscriber_acks_typed_payloads(sqlite_bus: BusHandle) -> None:
    received: list[common_pb2.FieldViolation] = []
    done = asyncio.Event()

    async def handle(item: Received) -> None:
        received.append(item.payload(common_pb2.FieldViolation))
        assert item.headers["traceparent"] == "00-1-2-01"
        if len(received) == 500:
            done.set()

    config = SubscriberConfig(topic="typed", group="g", start="earliest")
    subscriber = Subscriber(sqlite_bus.channel, config, handle)
    await subscriber.start()
    try:
        async with Publisher(sqlite_bus.channel, PublisherConfig(max_batch=100)) as publisher:
            results = await asyncio.gather(
                *[
                    publisher.publish(
                        "typed",
                        common_pb2.FieldViolation(field=f"f{i}", description="d"),
                        headers={"traceparent": "00-1-2-01"},
                    )
                    for i in range(500)
                ]
            )
        assert sorted(r.sequence for r in results) == list(range(1, 501))
        await asyncio.wait_for(done.wait(), 20)
        assert {v.field for v in received} == {f"f{i}" for i in range(500)}
        for _ in range(100):
            info = (await sqlite_bus.stub.GetTopic(bus_pb2.GetTopicRequest(name="typed"))).topic
            if info.groups[0].ack_floor == 500:
                break
            await asyncio.sleep(0.05)
        assert info.groups[0].ack_floor == 500
    finally:
        await subscriber.stop()


async def test_failing_handler_is_retried_and_terminate_dead_letters(sqlite_bus: BusHandle) -> None:
    attempts: dict[bytes, list[int]] = {}

    async def handle(item: Received) -> None:
        attempts.setdefault(item.message.payload, []).append(item.attempt)
        if item.message.payload == b"flaky" and item.attempt == 1:
            raise RuntimeError("first try fails")
        if item.message.payload == b"bad":
            raise Terminate("cannot parse")

    config = SubscriberConfig(topic="jobs", group="g", start="earliest", redelivery_backoff=0.05)
    subscriber = Subscriber(sqlite_bus.channel, config, handle)
    await subscriber.start()
    try:
        sync = SyncPublisher(grpc.insecure_channel(sqlite_bus.address))
        await asyncio.to_thread(sync.publish, "jobs", b"flaky")
        await asyncio.to_thread(sync.publish, "jobs", b"bad")
        dead_request = bus_pb2.ListDeadLettersRequest(topic="jobs", group="g")
        for _ in range(200):
            listed = await sqlite_bus.stub.ListDeadLetters(dead_request)
            if attempts.get(b"flaky") == [1, 2] and listed.dead_letters:
                break
            await asyncio.sleep(0.05)
        assert attempts[b"flaky"] == [1, 2]
        assert attempts[b"bad"] == [1]
        assert [d.reason for d in listed.dead_letters] == ["cannot parse"]
    finally:
        await subscriber.stop()


async def test_request_reply_helpers(sqlite_bus: BusHandle) -> None:
    with pytest.raises(UnavailableError, match="no responders"):
        await request(sqlite_bus.channel, "math.double", b"2")

    async def double(item: Received) -> bytes:
        return str(int(item.message.payload) * 2).encode()

    responder = Responder(sqlite_bus.channel, "math.double", double)
    await responder.start()
    try:
        asks = [request(sqlite_bus.channel, "math.double", str(i)) for i in range(50)]
        replies = await asyncio.gather(*asks)
        assert [r.payload for r in replies] == [str(i * 2).encode() for i in range(50)]
        sync_reply = await asyncio.to_thread(
            request_sync, grpc.insecure_channel(sqlite_bus.address), "math.double", b"21"
        )
        assert sync_reply.payload == b"42"
    finally:
        await responder.stop()

    async def never(item: Received) -> bytes:
        await asyncio.sleep(10)
        return b""

    slow = Responder(sqlite_bus.channel, "slow", never)
    await slow.start()
    try:
        with pytest.raises(DeadlineExceededError):
            await request(sqlite_bus.channel, "slow", b"x", within=0.3)
    finally:
        await slow.stop()


async def test_publish_event_helper(sqlite_bus: BusHandle) -> None:
    got: asyncio.Queue[Received] = asyncio.Queue()

    async def handle(item: Received) -> None:
        got.put_nowait(item)

    subscriber = Subscriber(sqlite_bus.channel, SubscriberConfig(topic="events.>", broadcast=True), handle)
    await subscriber.start()
    try:
        await publish_event(sqlite_bus.channel, "user.signed_up", b"{}", source="accounts")
        item = await asyncio.wait_for(got.get(), 10)
        assert item.message.topic == "events.user.signed_up"
        assert item.headers["rpcmesh-event-source"] == "accounts"
    finally:
        await subscriber.stop()


async def test_partial_publish_reports_bad_messages_per_item(sqlite_bus: BusHandle) -> None:
    big = bus_pb2.BusMessage(id="too-big", payload=b"y" * (1024 * 1024 + 1))
    response = await sqlite_bus.stub.Publish(
        bus_pb2.PublishRequest(
            topic="partial",
            messages=[bus_pb2.BusMessage(payload=b"a"), big, bus_pb2.BusMessage(payload=b"b")],
            partial=True,
        )
    )
    codes = [(r.code, r.sequence) for r in response.results]
    assert codes == [(0, 1), (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], 0), (0, 2)]
    assert response.results[1].id == "too-big" and "messages[1].payload" in response.results[1].error
    # The batching Publisher sends partial batches: only the bad message's caller fails.
    async with Publisher(sqlite_bus.channel, PublisherConfig(max_batch=10, linger=0.01)) as publisher:
        outcomes = await asyncio.gather(
            publisher.publish("partial", b"c"),
            publisher.publish("partial", b"y" * (1024 * 1024 + 1)),
            publisher.publish("partial", b"d"),
            return_exceptions=True,
        )
    assert isinstance(outcomes[1], ResourceExhaustedError)
    assert [o.sequence for o in outcomes if isinstance(o, bus_pb2.PublishResult)] == [3, 4]


async def test_subscriber_starts_at_a_sequence_or_a_time(sqlite_bus: BusHandle) -> None:
    for payload in (b"1", b"2"):
        await sqlite_bus.stub.Publish(
            bus_pb2.PublishRequest(topic="history", messages=[bus_pb2.BusMessage(payload=payload)])
        )
    await asyncio.sleep(0.05)
    marker = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await sqlite_bus.stub.Publish(
        bus_pb2.PublishRequest(topic="history", messages=[bus_pb2.BusMessage(payload=b"3")])
    )
    seen: dict[str, list[bytes]] = {"seq": [], "time": []}

    def collect(name: str) -> Callable[[Received], Awaitable[None]]:
        async def handle(item: Received) -> None:
            seen[name].append(item.message.payload)

        return handle

    subs = [
        Subscriber(
            sqlite_bus.channel, SubscriberConfig(topic="history", group="seq", start=2), collect("seq")
        ),
        Subscriber(
            sqlite_bus.channel, SubscriberConfig(topic="history", group="time", start=marker), collect("time")
        ),
    ]
    for sub in subs:
        await sub.start()
    try:
        for _ in range(100):
            if len(seen["seq"]) >= 2 and seen["time"]:
                break
            await asyncio.sleep(0.05)
        assert seen == {"seq": [b"2", b"3"], "time": [b"3"]}
    finally:
        for sub in subs:
            await sub.stop()
    with pytest.raises(ValueError, match="sequence"):
        SubscriberConfig(topic="t", group="g", start=0)
    with pytest.raises(ValueError, match="timezone"):
        SubscriberConfig(topic="t", group="g", start=datetime(2026, 1, 1))


async def test_sync_subscriber_runs_a_plain_function_with_the_correlation_id(sqlite_bus: BusHandle) -> None:
    got: list[tuple[bytes, str | None]] = []
    done = threading.Event()

    def handle(item: Received) -> None:
        got.append((item.message.payload, correlation_id()))
        if len(got) == 3:
            done.set()

    def threaded_program() -> None:
        # Blocking code, as in a script: the in-process Bus keeps serving on the test's loop.
        config = SubscriberConfig(topic="threads", group="g", start="earliest")
        channel = grpc.insecure_channel(sqlite_bus.address)
        try:
            publisher = SyncPublisher(channel)
            with use_correlation_id("sync-corr"):
                for payload in (b"a", b"b", b"c"):
                    publisher.publish("threads", payload)
            with SyncSubscriber(sqlite_bus.address, config, handle):
                assert done.wait(20)
        finally:
            channel.close()

    await asyncio.to_thread(threaded_program)
    assert sorted(got) == [(b"a", "sync-corr"), (b"b", "sync-corr"), (b"c", "sync-corr")]
