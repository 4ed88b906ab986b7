"""How the coordinator calls participants: a small StepInvoker protocol and its gRPC implementation.

Calls are generic, byte-level unary gRPC calls: the coordinator sends the
bytes its PayloadTemplate built and keeps the bytes it gets back, so a
participant is an ordinary gRPC method in any language. Targets are found by
their Registry name.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from typing import Protocol

import grpc
import grpc.aio

from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

# Metadata every step and compensation call carries.
SAGA_ID_KEY = "x-saga-id"
SAGA_STEP_KEY = "x-saga-step"
SAGA_PHASE_KEY = "x-saga-phase"
IDEMPOTENCY_KEY = "x-idempotency-key"
CORRELATION_ID_KEY = "x-correlation-id"
TRACE_KEYS = ("traceparent", "tracestate", "baggage")


class StepCallError(Exception):
    """A participant call failed with a gRPC status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class StepInvoker(Protocol):
    """Calls one method of a service by its Registry name, with raw bytes."""

    async def invoke(
        self,
        service: str,
        method: str,
        request: bytes,
        *,
        deadline: float,
        metadata: Sequence[tuple[str, str]],
    ) -> bytes:
        """The response bytes; raises StepCallError with the status code on failure."""
        ...

    async def close(self) -> None:
        """Release channels."""
        ...


def _identity(data: bytes) -> bytes:
    return data


class RegistryStepInvoker:
    """Resolves services through the Registry and calls them over cached channels, round robin."""

    def __init__(self, registry_address: str, *, cache_seconds: float = 2.0) -> None:
        self._registry_channel = grpc.aio.insecure_channel(registry_address)
        self._registry = registry_pb2_grpc.RegistryStub(self._registry_channel)
        self._cache_seconds = cache_seconds
        self._resolved: dict[str, tuple[float, list[str]]] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._turn = itertools.count()
        self._lock = asyncio.Lock()

    async def _addresses(self, service: str) -> list[str]:
        cached = self._resolved.get(service)
        if cached and time.monotonic() - cached[0] < self._cache_seconds:
            return cached[1]
        try:
            response = await self._registry.Resolve(registry_pb2.ResolveRequest(service=service), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            raise StepCallError(
                grpc.StatusCode.UNAVAILABLE.value[0], f"resolving {service!r}: {exc.details()}"
            ) from exc
        addresses = [instance.address for instance in response.instances]
        self._resolved[service] = (time.monotonic(), addresses)
        return addresses

    async def invoke(
        self,
        service: str,
        method: str,
        request: bytes,
        *,
        deadline: float,
        metadata: Sequence[tuple[str, str]],
    ) -> bytes:
        """One attempt against one instance; the coordinator owns retries."""
        addresses = await self._addresses(service)
        if not addresses:
            raise StepCallError(
                grpc.StatusCode.UNAVAILABLE.value[0], f"no instance of {service!r} is registered"
            )
        address = addresses[next(self._turn) % len(addresses)]
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        call = channel.unary_unary(method, request_serializer=_identity, response_deserializer=_identity)
        try:
            response: bytes = await call(request, timeout=deadline, metadata=tuple(metadata))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._resolved.pop(service, None)
            raise StepCallError(exc.code().value[0], exc.details() or "") from exc
        return response

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        await self._registry_channel.close()
