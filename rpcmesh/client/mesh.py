"""Mesh, the asyncio entry point: given the Registry address(es), it hands out channels by service name.

Usage::

    async with Mesh("127.0.0.1:50051") as mesh:
        stub = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
        reply = await stub.Echo(echo_pb2.EchoRequest(message="hi"))

Each service is discovered once, through a Registry Watch started on its first
``channel()``; calls read the in-process cache and never wait on the Registry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from rpcmesh.client._aio_service import AioService
from rpcmesh.client.breaker import BreakerSnapshot
from rpcmesh.client.channel import MeshChannel
from rpcmesh.client.endpoints import EndpointView
from rpcmesh.client.policy import MeshPolicy
from rpcmesh.security.client import ClientSecurity, aio_channel
from rpcmesh.tasks import stop_tasks
from rpcmesh.telemetry.setup import Telemetry
from rpcmesh.v1 import registry_pb2_grpc

_REGISTRY_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5000),
]
"""The Registry channel reconnects within the watch's own backoff (5 s at most), not gRPC's
default (growing to 120 s): after a long Registry outage the watch resumes as soon as it is back."""

__all__ = ["Mesh"]


class Mesh:
    """Service discovery, load balancing and resilience for asyncio gRPC clients.

    Args:
        registry: Registry address ``host:port``, or several (tried in turn).
        policy: Call policies; defaults apply when omitted.
        channel_options: gRPC channel options for every sub-channel.
        interceptors: Client interceptors run per attempt on every sub-channel
            (the first listed is the outermost); the mesh's retry layer wraps them all.
        security: TLS/mTLS and bearer token for the Registry and every instance;
            ``ClientSecurity.from_env()`` when None (plaintext when nothing is set).
        telemetry: The telemetry handle to record into; None follows
            ``rpcmesh.telemetry.get_telemetry()``. While it is active every call gets
            a span with one CLIENT span per attempt under it (each sub-channel is wrapped by
            ``trace_aio_channel``, so ``interceptors`` run inside the attempt's span); while
            it is off nothing is added and only a current correlation id travels
            (``x-correlation-id``).
    """

    def __init__(
        self,
        registry: str | Sequence[str],
        *,
        policy: MeshPolicy | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        security: ClientSecurity | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.security = security if security is not None else ClientSecurity.from_env()
        self._telemetry = telemetry
        self._registries = [registry] if isinstance(registry, str) else list(registry)
        if not self._registries:
            raise ValueError("registry: at least one address is needed")
        self.policy = policy or MeshPolicy()
        self._options = list(channel_options)
        self._interceptors = list(interceptors)
        self._services: dict[str, AioService] = {}
        self._registry_channel: grpc.aio.Channel | None = None
        self._registry_stub: registry_pb2_grpc.RegistryAsyncStub | None = None
        self._registry_index = 0
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    def _stub(self, rotate: bool) -> registry_pb2_grpc.RegistryAsyncStub:
        if rotate and len(self._registries) > 1 and self._registry_channel is not None:
            old = self._registry_channel
            closing = asyncio.get_running_loop().create_task(old.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            self._registry_channel = None
            self._registry_index += 1
        if self._registry_channel is None or self._registry_stub is None:
            address = self._registries[self._registry_index % len(self._registries)]
            self._registry_channel = aio_channel(address, self.security, options=_REGISTRY_CHANNEL_OPTIONS)
            self._registry_stub = registry_pb2_grpc.RegistryStub(self._registry_channel)
        return self._registry_stub

    def _service(self, name: str) -> AioService:
        if self._closed:
            raise RuntimeError("the mesh is closed")
        service = self._services.get(name)
        if service is None:
            service = AioService(
                name,
                self.policy.for_service(name),
                self._stub,
                channel_options=self._options,
                interceptors=self._interceptors,
                security=self.security,
                telemetry=self._telemetry,
            )
            self._services[name] = service
            service.start()
        return service

    def channel(self, service: str) -> MeshChannel:
        """A channel to ``service``, usable with any generated stub (must run inside the event loop)."""
        return MeshChannel(self._service(service))

    async def wait_for_instances(
        self, service: str, count: int = 1, within: float = 10.0
    ) -> list[EndpointView]:
        """Wait until at least ``count`` passing instances of ``service`` are known."""
        svc = self._service(service)
        deadline = asyncio.get_running_loop().time() + within
        while True:
            views = svc.core.endpoints()
            if len(views) >= count:
                return views
            if asyncio.get_running_loop().time() >= deadline:
                raise TimeoutError(f"{service}: {len(views)} instance(s) known, wanted {count}")
            await asyncio.sleep(0.02)

    def endpoints(self, service: str) -> list[EndpointView]:
        """The known passing instances of ``service`` with load, picks and breaker state."""
        return self._service(service).core.endpoints()

    def breakers(self, service: str) -> dict[str, BreakerSnapshot]:
        """Breaker states of ``service``: the service breaker and one per instance, by name."""
        core = self._service(service).core
        found: dict[str, BreakerSnapshot] = {}
        if core.breaker is not None:
            found[core.breaker.name] = core.breaker.snapshot()
        for view in core.endpoints():
            if view.breaker is not None:
                found[view.breaker.name] = view.breaker
        return found

    def retry_budget_tokens(self, service: str) -> float:
        """Tokens left in the retry budget of ``service``."""
        return self._service(service).core.budget.tokens

    async def close(self) -> None:
        """Stop every watch and close every sub-channel."""
        self._closed = True
        for service in self._services.values():
            await service.close()
        self._services.clear()
        if self._registry_channel is not None:
            await self._registry_channel.close()
            self._registry_channel = None
        await stop_tasks(list(self._closing))

    async def __aenter__(self) -> Mesh:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
