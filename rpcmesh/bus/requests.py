"""Request/reply over the Bus: ask and wait for the first reply, or answer requests.

:func:`request` calls ``Bus.Request``: ``DeadlineExceededError`` when no reply
comes in time, ``UnavailableError`` ("no responders") at once when nobody
subscribes to the topic. :class:`Responder` subscribes to a topic and answers
each request with whatever its handler returns, through ``Bus.Reply``.

Tracing: a request runs in a PRODUCER span whose context and correlation id
travel in the request's headers; the responder's handler runs in a CONSUMER
span continuing it, and the reply carries that span's context and the same
correlation id.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import grpc
import grpc.aio
from google.protobuf.message import Message

from rpcmesh.bus.publisher import build_message
from rpcmesh.bus.subscriber import Received, Subscriber, SubscriberConfig
from rpcmesh.errors import from_rpc_error
from rpcmesh.telemetry import inject_message_headers, producer_span
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc


async def request(
    channel: grpc.aio.Channel,
    topic: str,
    payload: Message | bytes | str,
    *,
    within: float = 5.0,
    headers: Mapping[str, str] | None = None,
    content_type: str = "",
) -> bus_pb2.BusMessage:
    """Publish a request on ``topic`` and return the first reply within ``within`` seconds."""
    message = build_message(payload, headers=headers, content_type=content_type)
    with producer_span(topic, message.headers):
        call = bus_pb2.RequestRequest(topic=topic, message=message)
        call.timeout.FromNanoseconds(int(within * 1e9))
        try:
            response = await bus_pb2_grpc.BusStub(channel).Request(call, timeout=within + 5.0)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
    return response.reply


def request_sync(
    channel: grpc.Channel,
    topic: str,
    payload: Message | bytes | str,
    *,
    within: float = 5.0,
    headers: Mapping[str, str] | None = None,
    content_type: str = "",
) -> bus_pb2.BusMessage:
    """Blocking :func:`request` over a ``grpc.Channel``."""
    message = build_message(payload, headers=headers, content_type=content_type)
    with producer_span(topic, message.headers):
        call = bus_pb2.RequestRequest(topic=topic, message=message)
        call.timeout.FromNanoseconds(int(within * 1e9))
        try:
            response = bus_pb2_grpc.BusStub(channel).Request(call, timeout=within + 5.0)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
    return response.reply


ReplyHandler = Callable[[Received], Awaitable[Message | bytes | str]]


class Responder:
    """Answers requests on a topic with its handler's return value."""

    def __init__(
        self, channel: grpc.aio.Channel, topic: str, handler: ReplyHandler, *, group: str = "responders"
    ) -> None:
        self._stub = bus_pb2_grpc.BusStub(channel)
        self._handler = handler
        # Requests are answered at most once: a failed handler dead-letters
        # instead of retrying after the requester has given up.
        config = SubscriberConfig(topic=topic, group=group, max_deliveries=1, ack_deadline=30.0)
        self.subscriber = Subscriber(channel, config, self._answer)

    async def _answer(self, received: Received) -> None:
        message = received.message
        if not message.reply_to:
            return
        reply = build_message(await self._handler(received))
        # Runs inside the delivery's CONSUMER span: the reply points at it and
        # carries the request's correlation id.
        inject_message_headers(reply.headers)
        await self._stub.Reply(
            bus_pb2.ReplyRequest(
                reply_to=message.reply_to, correlation_id=message.correlation_id, message=reply
            )
        )

    async def start(self) -> None:
        """Subscribe; returns once the Bus confirmed the subscription."""
        await self.subscriber.start()

    async def stop(self) -> None:
        """Stop answering."""
        await self.subscriber.stop()
