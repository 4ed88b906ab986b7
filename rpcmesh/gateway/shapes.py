"""Learn a method's RPC shape (unary or streaming each way) from the backend's server reflection.

The gateway serves every method as a bidirectional stream, which is what all
four shapes are on the wire. To forward with the right shape — so that unary
calls get the client stack's full retry and hedging policies — it asks the
backend, once per gRPC service, through server reflection: ``grpc.reflection.v1``
first, then ``grpc.reflection.v1alpha`` when v1 is UNIMPLEMENTED (older hosts;
the two share their messages). Backends without reflection are forwarded as
bidirectional streams, which works for any shape.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

REFLECTION_METHODS = (
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)


class Shape(enum.Enum):
    """The four RPC shapes."""

    UNARY_UNARY = (False, False)
    UNARY_STREAM = (False, True)
    STREAM_UNARY = (True, False)
    STREAM_STREAM = (True, True)

    @classmethod
    def of(cls, client_streaming: bool, server_streaming: bool) -> Shape:
        """The shape with these streaming flags."""
        return cls((client_streaming, server_streaming))


def shapes_from_files(files: list[bytes], grpc_service: str) -> dict[str, Shape]:
    """Method name -> Shape for grpc_service, from serialized FileDescriptorProtos."""
    shapes: dict[str, Shape] = {}
    for raw in files:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        for service in proto.service:
            full_name = f"{proto.package}.{service.name}" if proto.package else service.name
            if full_name == grpc_service:
                for method in service.method:
                    shapes[method.name] = Shape.of(method.client_streaming, method.server_streaming)
    return shapes


ChannelFor = Callable[[str], grpc.aio.Channel]


class ShapeCache:
    """Remembers the shapes of each gRPC service's methods, asking reflection once per service."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._timeout = timeout
        self._known: dict[str, dict[str, Shape]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def shape(self, channel: grpc.aio.Channel, grpc_service: str, method_name: str) -> Shape:
        """The shape of grpc_service/method_name, or STREAM_STREAM when it cannot be learned."""
        known = self._known.get(grpc_service)
        if known is None:
            lock = self._locks.setdefault(grpc_service, asyncio.Lock())
            async with lock:
                known = self._known.get(grpc_service)
                if known is None:
                    known = await self._ask(channel, grpc_service)
                    if known:
                        self._known[grpc_service] = known
        return known.get(method_name, Shape.STREAM_STREAM)

    async def _ask(self, channel: grpc.aio.Channel, grpc_service: str) -> dict[str, Shape]:
        for method in REFLECTION_METHODS:
            try:
                return await self._ask_with(channel, method, grpc_service)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return {}
        return {}

    async def _ask_with(self, channel: grpc.aio.Channel, method: str, grpc_service: str) -> dict[str, Shape]:
        """Ask one reflection service; raises its AioRpcError (UNIMPLEMENTED: try the next)."""
        call = channel.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )

        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=grpc_service)

        async for response in call(requests(), timeout=self._timeout):
            if response.HasField("file_descriptor_response"):
                files = list(response.file_descriptor_response.file_descriptor_proto)
                return shapes_from_files(files, grpc_service)
            return {}
        return {}
