"""The control-plane server: components on one grpc.aio server, with health and reflection."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import cast

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from rpcmesh.controlplane.component import Component, ControlPlaneContext
from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.security.settings import ServerSecurity
from rpcmesh.telemetry.aio_server import trace_aio_server
from rpcmesh.telemetry.config import TelemetryConfig
from rpcmesh.telemetry.correlation import install_log_correlation
from rpcmesh.telemetry.setup import setup_telemetry

logger = logging.getLogger(__name__)


def build_components(config: ControlPlaneConfig) -> list[Component]:
    """The components `rpcmesh up` serves for this configuration."""
    # Imported here: each component pulls in its storage drivers (psycopg, nats-py).
    from rpcmesh.controlplane.bus.component import BusComponent
    from rpcmesh.controlplane.eventstore.component import EventStoreComponent
    from rpcmesh.controlplane.registry.component import RegistryComponent
    from rpcmesh.controlplane.saga.component import SagaCoordinatorComponent

    eventstore = EventStoreComponent(config)
    return [
        RegistryComponent(config),
        BusComponent(config),
        eventstore,
        SagaCoordinatorComponent(config, eventstore=eventstore),
    ]


class ControlPlane:
    """Runs the control-plane components in one gRPC server.

    Usage::

        plane = ControlPlane(ControlPlaneConfig(port=0))
        address = await plane.start()
        ...
        await plane.stop()
    """

    def __init__(self, config: ControlPlaneConfig, components: Sequence[Component] | None = None) -> None:
        self.config = config
        self.components = list(components) if components is not None else build_components(config)
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._started: list[Component] = []
        self.address = ""
        self.security: ServerSecurity | None = None

    @property
    def service_names(self) -> list[str]:
        """Every gRPC service this process serves."""
        names = [name for component in self.components for name in component.service_names]
        return [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]

    async def start(self) -> str:
        """Bind, start every component and begin serving; returns the bound host:port."""
        # Reads certificates, token secret and policy now: a bad file fails the start.
        security = ServerSecurity.build(self.config.security)
        self.security = security
        # No server interceptors: with any, grpc.aio looks every call's handler up through an
        # interceptor coroutine chain. Each handler is wrapped once, at registration, by two
        # proxies; the one nearer the server wraps outermost. Outermost, the security guard
        # (refused calls cost the least; it also maps rpcmesh StatusErrors to their status, so
        # no StatusErrorInterceptor layer), then tracing (SERVER spans, correlation id; it
        # records a StatusError's precise code itself).
        server = grpc.aio.server(
            options=security.options,
            maximum_concurrent_rpcs=security.maximum_concurrent_rpcs,
        )
        self._server = server
        registrar = cast(grpc.aio.Server, trace_aio_server(security.guarded(server)))
        for component in self.components:
            component.add_to_server(registrar)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, registrar)
        # The aio servicer named explicitly: enable_server_reflection picks the sync one for a proxy.
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer([*self.service_names, reflection.SERVICE_NAME]), registrar
        )
        port = security.add_port(server, self.config.address)
        if port == 0:
            raise OSError(f"cannot listen on {self.config.address}")
        self.address = f"{self.config.host}:{port}"
        context = ControlPlaneContext(config=self.config, address=self.address)
        for name in ("", *self.service_names):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            for component in self.components:
                await component.start(context)
                self._started.append(component)
            await server.start()
        except BaseException:
            await self.stop()
            raise
        for name in ("", *self.service_names):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("control plane serving %s on %s", ", ".join(self.service_names), self.address)
        return self.address

    async def stop(self) -> None:
        """Report NOT_SERVING, drain calls within the grace period, stop components."""
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.config.grace)
            self._server = None
        for component in reversed(self._started):
            try:
                await component.stop()
            except Exception:
                logger.exception("stopping %s failed", type(component).__name__)
        self._started.clear()

    async def wait(self) -> None:
        """Block until the server terminates."""
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(config: ControlPlaneConfig, ready: asyncio.Event | None = None) -> None:
    """Run a control plane until cancelled (SIGINT/SIGTERM in the CLI).

    Telemetry comes from the standard ``OTEL_*`` variables (off when none is set) and is
    flushed and shut down on exit; every log record carries the correlation id.
    """
    install_log_correlation()
    telemetry = setup_telemetry(TelemetryConfig.from_env())
    plane = ControlPlane(config)
    try:
        address = await plane.start()
        if plane.security is not None:
            for line in plane.security.warnings(address):
                print(line, file=sys.stderr, flush=True)
        print(f"rpcmesh control plane listening on {address}", flush=True)
        if ready is not None:
            ready.set()
        await plane.wait()
    finally:
        try:
            await asyncio.shield(plane.stop())
        finally:
            await asyncio.to_thread(telemetry.shutdown)
