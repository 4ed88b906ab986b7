"""Behaviour of the Bus, run on every backend (SQLite and NATS JetStream)."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
import pytest
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc

from rpcmesh.controlplane.bus.component import BusComponent
from rpcmesh.controlplane.server import ControlPlane
from rpcmesh.errors import from_rpc_error
from tests.integration.bus.conftest import BusHandle
from tests.integration.bus.streams import RawSubscriber, options


def msg(payload: bytes, **kwargs: object) -> bus_pb2.BusMessage:
    return bus_pb2.BusMessage(payload=payload, **kwargs)  # type: ignore[arg-type]


async def publish(bus: BusHandle, topic: str, *payloads: bytes, **kwargs: object) -> bus_pb2.PublishResponse:
    return await bus.stub.Publish(
        bus_pb2.PublishRequest(topic=topic, messages=[msg(p, **kwargs) for p in payloads])
    )


async def subscriber(bus: BusHandle, opts: bus_pb2.SubscriptionOptions) -> RawSubscriber:
    sub = RawSubscriber(bus.stub, opts)
    await sub.opened()
    return sub


async def status_of(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def test_publish_assigns_sequences_and_deduplicates(bus: BusHandle) -> None:
    topic = bus.topic("orders")
    first = await bus.stub.Publish(
        bus_pb2.PublishRequest(topic=topic, messages=[msg(b"a", id="m-1"), msg(b"b"), msg(b"c", id="m-1")])
    )
    assert [(r.sequence, r.duplicate) for r in first.results] == [(1, False), (2, False), (1, True)]
    assert first.results[1].id
    again = await publish(bus, topic, b"a", id="m-1")
    assert again.results[0].duplicate and again.results[0].sequence == 1
    info = (await bus.stub.GetTopic(bus_pb2.GetTopicRequest(name=topic))).topic
    assert (info.first_sequence, info.last_sequence, info.message_count) == (1, 2, 2)


async def test_subscribe_delivers_with_headers_intact_and_acks_advance_floor(bus: BusHandle) -> None:
    topic = bus.topic("orders")
    headers = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "baggage": "k=v",
        "x-correlation-id": "c-1",
    }
    await bus.stub.Publish(
        bus_pb2.PublishRequest(
            topic=topic,
            messages=[msg(b"one", headers=headers, key="k1", content_type="text/plain"), msg(b"two")],
        )
    )
    sub = await subscriber(bus, options(topic))
    try:
        got = await sub.receive(2)
        assert [d.message.payload for d in got] == [b"one", b"two"]
        assert dict(got[0].message.headers) == headers
        assert got[0].message.key == "k1" and got[0].message.content_type == "text/plain"
        assert got[0].message.topic == topic and got[0].attempt == 1
        assert got[0].message.publish_time.seconds > 0
        sub.ack(got)
        for _ in range(100):
            info = (await bus.stub.GetTopic(bus_pb2.GetTopicRequest(name=topic))).topic
            if info.groups and info.groups[0].ack_floor == 2:
                break
            await asyncio.sleep(0.05)
        assert info.groups[0].name == "g" and info.groups[0].ack_floor == 2 and info.groups[0].pending == 0
    finally:
        await sub.close()


async def test_new_only_start_skips_old_messages(bus: BusHandle) -> None:
    topic = bus.topic("news")
    await publish(bus, topic, b"old")
    sub = await subscriber(bus, options(topic, earliest=False))
    try:
        await publish(bus, topic, b"new")
        got = await sub.receive(1)
        assert [d.message.payload for d in got] == [b"new"]
    finally:
        await sub.close()


async def test_competing_consumers_share_and_every_group_gets_all(bus: BusHandle) -> None:
    topic = bus.topic("work")
    a = await subscriber(bus, options(topic, "workers", max_in_flight=5))
    b = await subscriber(bus, options(topic, "workers", max_in_flight=5))
    audit = await subscriber(bus, options(topic, "audit"))
    try:
        await publish(bus, topic, *[str(i).encode() for i in range(10)])
        from_a = await a.receive(5)
        from_b = await b.receive(5)
        assert {d.message.sequence for d in from_a}.isdisjoint({d.message.sequence for d in from_b})
        assert {d.message.sequence for d in from_a + from_b} == set(range(1, 11))
        audited = await audit.receive(10)
        assert [d.message.sequence for d in audited] == list(range(1, 11))
    finally:
        for sub in (a, b, audit):
            await sub.close()


async def test_broadcast_delivers_to_every_subscriber(bus: BusHandle) -> None:
    topic = bus.topic("config")
    one = await subscriber(bus, options(topic, broadcast=True, earliest=False))
    two = await subscriber(bus, options(topic, broadcast=True, earliest=False))
    try:
        await publish(bus, topic, b"x", b"y")
        assert [d.message.payload for d in await one.receive(2)] == [b"x", b"y"]
        assert [d.message.payload for d in await two.receive(2)] == [b"x", b"y"]
    finally:
        await one.close()
        await two.close()


async def test_unacked_is_redelivered_then_dead_lettered_and_replayed(bus: BusHandle) -> None:
    topic = bus.topic("flaky")
    await publish(bus, topic, b"poison", headers={"x-correlation-id": "p-1"})
    sub = await subscriber(bus, options(topic, ack_deadline_ms=300, max_deliveries=2, backoff_ms=50))
    try:
        first = await sub.receive(1)
        second = await sub.receive(1)
        assert [first[0].attempt, second[0].attempt] == [1, 2]
        letters: list[bus_pb2.DeadLetter] = []
        for _ in range(100):
            listed = await bus.stub.ListDeadLetters(bus_pb2.ListDeadLettersRequest(topic=topic, group="g"))
            letters = list(listed.dead_letters)
            if letters:
                break
            await asyncio.sleep(0.05)
        assert len(letters) == 1
        assert letters[0].reason == "max_deliveries" and letters[0].attempts == 2 and letters[0].group == "g"
        assert letters[0].message.payload == b"poison"
        assert letters[0].message.headers["x-correlation-id"] == "p-1"
        info = (await bus.stub.GetTopic(bus_pb2.GetTopicRequest(name=topic))).topic
        assert info.groups[0].dead_letters == 1
        replayed = await bus.stub.ReplayDeadLetters(bus_pb2.ReplayDeadLettersRequest(topic=topic, group="g"))
        assert replayed.replayed == 1
        again = await sub.receive(1)
        assert again[0].message.payload == b"poison" and again[0].attempt == 1
        sub.ack(again)
        listed = await bus.stub.ListDeadLetters(bus_pb2.ListDeadLettersRequest(topic=topic, group="g"))
        assert list(listed.dead_letters) == []
    finally:
        await sub.close()


async def test_nak_with_delay_and_term(bus: BusHandle) -> None:
    topic = bus.topic("naks")
    await publish(bus, topic, b"retry", b"reject")
    sub = await subscriber(bus, options(topic))
    try:
        got = await sub.receive(2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        sub.nak(got[:1], delay_ms=300)
        sub.term(got[1:], "schema mismatch")
        again = await sub.receive(1)
        assert loop.time() - started >= 0.25
        assert again[0].message.payload == b"retry" and again[0].attempt == 2
        sub.ack(again)
        for _ in range(100):
            listed = await bus.stub.ListDeadLetters(bus_pb2.ListDeadLettersRequest(topic=topic, group="g"))
            if listed.dead_letters:
                break
            await asyncio.sleep(0.05)
        assert [(d.reason, d.message.payload) for d in listed.dead_letters] == [
            ("schema mismatch", b"reject")
        ]
    finally:
        await sub.close()


async def test_order_per_key_is_kept_within_a_group(bus: BusHandle) -> None:
    topic = bus.topic("keyed")
    a = await subscriber(bus, options(topic, "g"))
    b = await subscriber(bus, options(topic, "g"))
    try:
        await bus.stub.Publish(
            bus_pb2.PublishRequest(
                topic=topic, messages=[msg(f"k1-{i}".encode(), key="k1") for i in range(3)]
            )
        )
        seen: list[bytes] = []
        for _ in range(3):
            batch = []
            while not batch:
                batch = await a.nothing(0.2) + await b.nothing(0.2)
            assert len(batch) == 1, "a second message of the key went out before the first was acked"
            seen.append(batch[0].message.payload)
            a.ack(batch)
        assert seen == [b"k1-0", b"k1-1", b"k1-2"]
    finally:
        await a.close()
        await b.close()


async def test_wildcard_subscription_follows_new_topics(bus: BusHandle) -> None:
    sub = await subscriber(bus, options(bus.topic("region.*"), "g"))
    try:
        await publish(bus, bus.topic("region.eu"), b"eu")
        await publish(bus, bus.topic("region.us"), b"us")
        await publish(bus, bus.topic("region.us.west"), b"no")
        got = await sub.receive(2)
        assert sorted(d.message.payload for d in got) == [b"eu", b"us"]
        assert await sub.nothing(0.3) == []
    finally:
        await sub.close()


async def test_retention_by_count(bus: BusHandle) -> None:
    topic = bus.topic("bounded")
    retention = bus_pb2.Retention(max_messages=3)
    await bus.stub.CreateTopic(bus_pb2.CreateTopicRequest(name=topic, retention=retention))
    await publish(bus, topic, *[str(i).encode() for i in range(5)])
    info = (await bus.stub.GetTopic(bus_pb2.GetTopicRequest(name=topic))).topic
    assert (info.first_sequence, info.last_sequence, info.message_count) == (3, 5, 3)
    assert info.retention.max_messages == 3
    sub = await subscriber(bus, options(topic))
    try:
        assert [d.message.sequence for d in await sub.receive(3)] == [3, 4, 5]
    finally:
        await sub.close()
    other = bus_pb2.Retention(max_messages=4)
    error = await status_of(bus.stub.CreateTopic(bus_pb2.CreateTopicRequest(name=topic, retention=other)))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_publish_stream_acks_batches_in_order(bus: BusHandle) -> None:
    topic = bus.topic("stream")

    async def batches():  # type: ignore[no-untyped-def]
        for batch_id in range(1, 21):
            yield bus_pb2.PublishStreamRequest(
                topic=topic, batch_id=batch_id, messages=[msg(b"x" * 100) for _ in range(50)]
            )

    acks = [response async for response in bus.stub.PublishStream(batches())]
    assert [a.batch_id for a in acks] == list(range(1, 21))
    sequences = [r.sequence for a in acks for r in a.results]
    assert sequences == list(range(1, 1001))


async def test_events_reach_every_interested_service(bus: BusHandle) -> None:
    billing = await subscriber(bus, options(f"events.{bus.prefix}.>", "billing", earliest=False))
    shipping = await subscriber(bus, options(f"events.{bus.prefix}.order.*", "shipping", earliest=False))
    try:
        response = await bus.stub.PublishEvent(
            bus_pb2.PublishEventRequest(
                event_type=f"{bus.prefix}.order.created",
                source="orders",
                data=b"{}",
                content_type="application/json",
                headers={"traceparent": "00-abc-def-01"},
            )
        )
        assert response.result.sequence == 1
        for sub in (billing, shipping):
            got = await sub.receive(1)
            message = got[0].message
            assert message.topic == f"events.{bus.prefix}.order.created"
            assert message.headers["rpcmesh-event-source"] == "orders"
            assert message.headers["traceparent"] == "00-abc-def-01"
            assert message.content_type == "application/json"
    finally:
        await billing.close()
        await shipping.close()


async def test_request_reply(bus: BusHandle) -> None:
    topic = bus.topic("rpc")
    error = await status_of(bus.stub.Request(bus_pb2.RequestRequest(topic=topic, message=msg(b"ping"))))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "no responders" in (error.details() or "")
    responder = await subscriber(bus, options(topic, "responders", earliest=False))
    try:
        call = bus.stub.Request(bus_pb2.RequestRequest(topic=topic, message=msg(b"ping")))
        got = await responder.receive(1)
        request = got[0].message
        assert request.reply_to and request.correlation_id
        replied = await bus.stub.Reply(
            bus_pb2.ReplyRequest(
                reply_to=request.reply_to, correlation_id=request.correlation_id, message=msg(b"pong")
            )
        )
        assert replied.delivered
        responder.ack(got)
        assert (await call).reply.payload == b"pong"

        timeout = bus_pb2.RequestRequest(topic=topic, message=msg(b"slow"))
        timeout.timeout.FromMilliseconds(300)
        error = await status_of(bus.stub.Request(timeout))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        late = (await responder.receive(1))[0].message
        dropped = await bus.stub.Reply(
            bus_pb2.ReplyRequest(
                reply_to=late.reply_to, correlation_id=late.correlation_id, message=msg(b"late")
            )
        )
        assert not dropped.delivered
    finally:
        await responder.close()


async def test_bad_input_answers_precise_status_and_changes_nothing(bus: BusHandle) -> None:
    topic = bus.topic("strict")
    cases = [
        (
            bus.stub.Publish(bus_pb2.PublishRequest(topic="", messages=[msg(b"x")])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "topic",
        ),
        (
            bus.stub.Publish(bus_pb2.PublishRequest(topic=f"{topic}.*", messages=[msg(b"x")])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "topic",
        ),
        (
            bus.stub.Publish(
                bus_pb2.PublishRequest(topic=topic, messages=[msg(b"x"), msg(b"y" * (1024 * 1024 + 1))])
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "messages[1].payload",
        ),
        (
            bus.stub.Publish(
                bus_pb2.PublishRequest(topic=topic, messages=[msg(b"x", headers={"h": "v" * 20000})])
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "messages[0].headers",
        ),
        (
            bus.stub.ListDeadLetters(bus_pb2.ListDeadLettersRequest(topic=topic, group="nobody")),
            grpc.StatusCode.NOT_FOUND,
            "topic",
        ),
        (bus.stub.GetTopic(bus_pb2.GetTopicRequest(name=topic)), grpc.StatusCode.NOT_FOUND, "name"),
    ]
    for call, code, field in cases:
        error = await status_of(call)
        assert error.code() == code, (field, error)
        assert field in (error.details() or "")
    mapped = from_rpc_error(
        await status_of(bus.stub.Publish(bus_pb2.PublishRequest(topic="a..b", messages=[msg(b"")])))
    )
    assert mapped.code == grpc.StatusCode.INVALID_ARGUMENT
    listed = await bus.stub.ListTopics(bus_pb2.ListTopicsRequest())
    assert not [t for t in listed.topics if t.name.startswith(bus.prefix)]

    await publish(bus, topic, b"one")
    beyond_opts = options(topic, "late")
    beyond_opts.start.sequence = 99
    error = await status_of(_first(RawSubscriber(bus.stub, beyond_opts)))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE and "open.start.sequence" in (error.details() or "")
    error = await status_of(_first(RawSubscriber(bus.stub, options("", "g"))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "open.topic" in (error.details() or "")
    error = await status_of(
        bus.stub.ListDeadLetters(bus_pb2.ListDeadLettersRequest(topic=topic, group="nobody"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and "group" in (error.details() or "")
    info = (await bus.stub.GetTopic(bus_pb2.GetTopicRequest(name=topic))).topic
    assert [g.name for g in info.groups] == []


async def _first(sub: RawSubscriber) -> None:
    try:
        await sub.opened()
    finally:
        await sub.close()


async def test_start_at_sequence_and_time(bus: BusHandle) -> None:
    topic = bus.topic("history")
    await publish(bus, topic, b"1", b"2")
    await asyncio.sleep(0.05)
    marker = time.time_ns()
    await asyncio.sleep(0.05)
    await publish(bus, topic, b"3", b"4")
    by_sequence = options(topic, "from-two")
    by_sequence.start.sequence = 2
    by_time = options(topic, "from-time")
    by_time.start.time.FromNanoseconds(marker)
    one = await subscriber(bus, by_sequence)
    two = await subscriber(bus, by_time)
    try:
        assert [d.message.payload for d in await one.receive(3)] == [b"2", b"3", b"4"]
        assert [d.message.payload for d in await two.receive(2)] == [b"3", b"4"]
    finally:
        await one.close()
        await two.close()


async def test_group_progress_survives_a_restart(bus: BusHandle) -> None:
    topic = bus.topic("durable")
    await publish(bus, topic, b"a", b"b", b"c")
    sub = await subscriber(bus, options(topic))
    got = await sub.receive(3)
    sub.ack(got[:2])
    await asyncio.sleep(0.3)
    await sub.close()
    await bus.channel.close()
    await bus.plane.stop()
    plane = ControlPlane(bus.config, components=[BusComponent(bus.config)])
    address = await plane.start()
    channel = grpc.aio.insecure_channel(address)
    try:
        stub = bus_pb2_grpc.BusStub(channel)
        await stub.Publish(bus_pb2.PublishRequest(topic=topic, messages=[msg(b"d")]))
        again = RawSubscriber(stub, options(topic))
        await again.opened()
        try:
            assert [d.message.payload for d in await again.receive(2)] == [b"c", b"d"]
        finally:
            await again.close()
    finally:
        await channel.close()
        await plane.stop()


async def test_retention_by_bytes_and_age(bus: BusHandle) -> None:
    by_bytes = bus.topic("by-bytes")
    await bus.stub.CreateTopic(
        bus_pb2.CreateTopicRequest(name=by_bytes, retention=bus_pb2.Retention(max_bytes=2000))
    )
    await publish(bus, by_bytes, *[b"x" * 300 for _ in range(20)])
    info = (await bus.stub.GetTopic(bus_pb2.GetTopicRequest(name=by_bytes))).topic
    assert info.last_sequence == 20 and 0 < info.message_count < 20 and info.first_sequence > 1

    by_age = bus.topic("by-age")
    retention = bus_pb2.Retention()
    retention.max_age.FromMilliseconds(500)
    await bus.stub.CreateTopic(bus_pb2.CreateTopicRequest(name=by_age, retention=retention))
    await publish(bus, by_age, b"old")
    for _ in range(100):
        info = (await bus.stub.GetTopic(bus_pb2.GetTopicRequest(name=by_age))).topic
        if info.message_count == 0:
            break
        await asyncio.sleep(0.1)
    assert info.message_count == 0 and info.last_sequence == 1


async def test_list_and_delete_topics(bus: BusHandle) -> None:
    names = [bus.topic(f"list.t{i}") for i in range(3)]
    for name in names:
        await bus.stub.CreateTopic(bus_pb2.CreateTopicRequest(name=name))
    seen: list[str] = []
    token = ""
    while True:
        page = await bus.stub.ListTopics(bus_pb2.ListTopicsRequest(page_size=2, page_token=token))
        seen.extend(t.name for t in page.topics)
        token = page.next_page_token
        if not token:
            break
    assert [n for n in seen if n in names] == names
    await bus.stub.DeleteTopic(bus_pb2.DeleteTopicRequest(name=names[0]))
    error = await status_of(bus.stub.GetTopic(bus_pb2.GetTopicRequest(name=names[0])))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await status_of(bus.stub.DeleteTopic(bus_pb2.DeleteTopicRequest(name=names[0])))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_ack_of_a_sequence_never_published_is_out_of_range(bus: BusHandle) -> None:
    topic = bus.topic("acks")
    await publish(bus, topic, b"one")
    sub = await subscriber(bus, options(topic))
    try:
        got = await sub.receive(1)
        sub.send(
            bus_pb2.SubscribeRequest(ack=bus_pb2.Ack(refs=[bus_pb2.MessageRef(topic=topic, sequence=99)]))
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await sub.receive(1)
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert "ack.refs[0].sequence" in (info.value.details() or "")
        assert got[0].attempt == 1
    finally:
        await sub.close()
