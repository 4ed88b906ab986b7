"""Learn a method's RPC shape (unary or streaming each way) from the backend's server reflection.

The gateway serves every method as a bidirectional stream, which is what all
four shapes are on the wire. To forward with the right shape — so that unary
calls get the client stack's full retry and hedging policies — it asks the
backend, once per gRPC service, through server reflection: ``grpc.reflection.v1``
first, then ``grpc.reflection.v1alpha`` when v1 is UNIMPLEMENTED (older hosts;
the two share their messages). Backends without reflection are forwarded as
bidirectional streams, which works for any shape.

The HTTP ingress (:mod:`rpcmesh.gateway.http_ingress`) needs more than shapes: the
messages themselves, to turn JSON into protobuf and back. :meth:`ShapeCache.schema`
keeps the same reflection answer as a :class:`ServiceSchema` (the service's
descriptor in a pool of its own, built from the FileDescriptorProtos, and message
classes from ``message_factory.GetMessageClass``), and :meth:`ShapeCache.services`
lists a backend's gRPC services (reflection ``list_services``), for path routes
that name a registered service and a method only.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message_factory
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

# Services every ServiceHost adds beside the user's: never the target of a path route.
_INFRASTRUCTURE_PREFIXES = ("grpc.health.", "grpc.reflection.")


@dataclass(frozen=True)
class ServiceSchema:
    """A gRPC service's methods and message classes, from its reflection descriptors."""

    service: descriptor.ServiceDescriptor
    """The service's descriptor (in a pool of its own)."""

    def method(self, name: str) -> descriptor.MethodDescriptor | None:
        """The method called ``name``, if the service has one."""
        return self.service.methods_by_name.get(name)

    def shapes(self) -> dict[str, Shape]:
        """Method name -> Shape."""
        return {m.name: Shape.of(m.client_streaming, m.server_streaming) for m in self.service.methods}

    @staticmethod
    def message_class(message: descriptor.Descriptor) -> type[Any]:
        """The Python class of a message type of this schema."""
        return message_factory.GetMessageClass(message)


def schema_from_files(files: list[bytes], grpc_service: str) -> ServiceSchema | None:
    """The schema of ``grpc_service`` from serialized FileDescriptorProtos (None: not among them).

    Files are added to a fresh pool in dependency order, so any order of the reflection answer
    works; a file whose dependencies are missing leaves the service out (None).
    """
    protos = {}
    for raw in files:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        protos[proto.name] = proto
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str, trail: frozenset[str]) -> bool:
        if name in added:
            return True
        proto = protos.get(name)
        if proto is None or name in trail:
            return False
        if not all(add(dependency, trail | {name}) for dependency in proto.dependency):
            return False
        pool.Add(proto)
        added.add(name)
        return True

    for name in protos:
        add(name, frozenset())
    try:
        return ServiceSchema(pool.FindServiceByName(grpc_service))
    except KeyError:
        return None


class ShapeCache:
    """Remembers the shapes of each gRPC service's methods, asking reflection once per service."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._timeout = timeout
        self._known: dict[str, dict[str, Shape]] = {}
        self._schemas: dict[str, ServiceSchema] = {}
        self._services: dict[str, tuple[str, ...]] = {}
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

    async def schema(self, channel: grpc.aio.Channel, grpc_service: str) -> ServiceSchema | None:
        """The schema of ``grpc_service`` from the backend's reflection (asked once per service).

        None when the backend does not know the service. Raises the backend's AioRpcError when
        reflection cannot be reached (UNAVAILABLE, DEADLINE_EXCEEDED...) or is UNIMPLEMENTED.
        """
        found = self._schemas.get(grpc_service)
        if found is not None:
            return found
        lock = self._locks.setdefault(grpc_service, asyncio.Lock())
        async with lock:
            found = self._schemas.get(grpc_service)
            if found is None:
                request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=grpc_service)
                response = await self._reflect(channel, request)
                if response is not None and response.HasField("file_descriptor_response"):
                    files = list(response.file_descriptor_response.file_descriptor_proto)
                    found = schema_from_files(files, grpc_service)
                if found is not None:
                    self._schemas[grpc_service] = found
                    self._known[grpc_service] = found.shapes()
        if found is None:  # names callers made up must not grow the lock table
            self._locks.pop(grpc_service, None)
        return found

    async def services(self, channel: grpc.aio.Channel, registered: str) -> tuple[str, ...]:
        """The gRPC services of the ``registered`` service's backend, from reflection ``list_services``.

        Health and reflection are left out; asked once per registered service.
        """
        known = self._services.get(registered)
        if known is None:
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            response = await self._reflect(channel, request)
            names: list[str] = []
            if response is not None and response.HasField("list_services_response"):
                names = [s.name for s in response.list_services_response.service]
            known = tuple(n for n in names if not n.startswith(_INFRASTRUCTURE_PREFIXES))
            if known:
                self._services[registered] = known
        return known

    async def _ask(self, channel: grpc.aio.Channel, grpc_service: str) -> dict[str, Shape]:
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=grpc_service)
        try:
            response = await self._reflect(channel, request)
        except grpc.aio.AioRpcError:
            return {}
        if response is not None and response.HasField("file_descriptor_response"):
            files = list(response.file_descriptor_response.file_descriptor_proto)
            return shapes_from_files(files, grpc_service)
        return {}

    async def _reflect(
        self, channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
    ) -> reflection_pb2.ServerReflectionResponse | None:
        """One reflection question: v1 first, v1alpha when v1 is UNIMPLEMENTED; raises other errors."""
        for index, method in enumerate(REFLECTION_METHODS):
            try:
                return await self._ask_with(channel, method, request)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED or index == len(REFLECTION_METHODS) - 1:
                    raise
        return None

    async def _ask_with(
        self, channel: grpc.aio.Channel, method: str, request: reflection_pb2.ServerReflectionRequest
    ) -> reflection_pb2.ServerReflectionResponse | None:
        """Ask one reflection service; raises its AioRpcError (UNIMPLEMENTED: try the next)."""
        call = channel.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )

        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield request

        async for response in call(requests(), timeout=self._timeout):
            return response
        return None
