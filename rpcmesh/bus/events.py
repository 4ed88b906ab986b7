"""Broadcast events: ``publish_event`` writes ``events.<event_type>`` for every interested service."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
import grpc.aio
from google.protobuf.message import Message

from rpcmesh.bus.payloads import encode
from rpcmesh.errors import from_rpc_error
from rpcmesh.telemetry import producer_span
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc


async def publish_event(
    channel: grpc.aio.Channel,
    event_type: str,
    data: Message | bytes | str,
    *,
    source: str = "",
    headers: Mapping[str, str] | None = None,
    id: str = "",
    content_type: str = "",
) -> bus_pb2.PublishResult:
    """Publish an event; subscribers of ``events.<event_type>`` (or ``events.>``) receive it."""
    payload, kind = encode(data, content_type)
    request = bus_pb2.PublishEventRequest(
        event_type=event_type,
        source=source,
        data=payload,
        content_type=kind,
        headers=dict(headers or {}),
        id=id,
    )
    with producer_span(f"events.{event_type}", request.headers, message_id=id or None):
        try:
            response = await bus_pb2_grpc.BusStub(channel).PublishEvent(request)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
    return response.result
