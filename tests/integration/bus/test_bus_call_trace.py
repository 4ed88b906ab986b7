"""The caller's trace context in call metadata reaches messages that lack it (both backends).

A raw gRPC stub (as a non-Python client or the gateway would) sends
``traceparent``/``baggage``/``x-correlation-id`` as call metadata only; Publish,
PublishStream, PublishEvent and Request deliver them as message headers. A
message carrying its own trace keeps it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from rpcmesh.v1 import bus_pb2

from tests.integration.bus.conftest import BusHandle
from tests.integration.bus.streams import RawSubscriber, options

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OWN = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
METADATA = (("traceparent", TRACEPARENT), ("baggage", "tenant=t1"), ("x-correlation-id", "corr-meta"))
FROM_CALL = {"traceparent": TRACEPARENT, "baggage": "tenant=t1", "x-correlation-id": "corr-meta"}


async def delivered(bus: BusHandle, topic: str, count: int) -> list[bus_pb2.BusMessage]:
    sub = RawSubscriber(bus.stub, options(topic))
    try:
        await sub.opened()
        got = await sub.receive(count)
        sub.ack(got)
        return [d.message for d in got]
    finally:
        await sub.close()


async def test_publish_paths_copy_call_metadata_into_messages(bus: BusHandle) -> None:
    topic = bus.topic("traced")
    await bus.stub.Publish(
        bus_pb2.PublishRequest(
            topic=topic,
            messages=[
                bus_pb2.BusMessage(payload=b"bare"),
                bus_pb2.BusMessage(payload=b"own", headers={"traceparent": OWN, "x-correlation-id": "mine"}),
            ],
        ),
        metadata=METADATA,
    )

    async def batches() -> AsyncIterator[bus_pb2.PublishStreamRequest]:
        yield bus_pb2.PublishStreamRequest(
            batch_id=1, topic=topic, messages=[bus_pb2.BusMessage(payload=b"streamed")]
        )

    async for _ in bus.stub.PublishStream(batches(), metadata=METADATA):
        pass
    event_type = f"{bus.prefix}.happened"
    await bus.stub.PublishEvent(
        bus_pb2.PublishEventRequest(event_type=event_type, data=b"e"), metadata=METADATA
    )

    bare, own, streamed = await delivered(bus, topic, 3)
    assert {k: bare.headers[k] for k in FROM_CALL} == FROM_CALL
    assert dict(own.headers) == {"traceparent": OWN, "x-correlation-id": "mine"}
    assert {k: streamed.headers[k] for k in FROM_CALL} == FROM_CALL
    (event,) = await delivered(bus, f"events.{event_type}", 1)
    assert {k: event.headers[k] for k in FROM_CALL} == FROM_CALL


async def test_request_copies_call_metadata(bus: BusHandle) -> None:
    topic = bus.topic("asks")
    responder = RawSubscriber(bus.stub, options(topic, "responders", earliest=False))
    try:
        await responder.opened()
        call = asyncio.ensure_future(
            bus.stub.Request(
                bus_pb2.RequestRequest(topic=topic, message=bus_pb2.BusMessage(payload=b"q")),
                metadata=METADATA,
            )
        )
        (delivery,) = await responder.receive(1)
        assert {k: delivery.message.headers[k] for k in FROM_CALL} == FROM_CALL
        await bus.stub.Reply(
            bus_pb2.ReplyRequest(
                reply_to=delivery.message.reply_to,
                correlation_id=delivery.message.correlation_id,
                message=bus_pb2.BusMessage(payload=b"a"),
            )
        )
        responder.ack([delivery])
        assert (await asyncio.wait_for(call, 10)).reply.payload == b"a"
    finally:
        await responder.close()
