"""ServiceHost: serves user servicers with health and reflection, registered with the Registry.

Lifecycle::

    host = ServiceHost(ServiceHostConfig(service="echo", registry="127.0.0.1:50051"))
    host.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, EchoServicer("a"))
    await host.run()   # start, print "listening on HOST:PORT", wait for SIGTERM/SIGINT, stop

``stop()`` (also run on SIGTERM) first reports NOT_SERVING on grpc.health.v1 and
to the Registry, deregisters so clients stop picking the instance, waits
``drain_delay`` for watchers to hear of it, then lets in-flight calls finish
within ``grace`` seconds before the server exits.

Server interceptors, outermost first: the security interceptor (TLS identity or
bearer token, per-connection and per-identity limits; ``config.security``), the
tracing interceptor (SERVER span, correlation id for ``correlation_id()``; with
telemetry off it only adopts the correlation id), :class:`CallContextInterceptor`
(deadline and request id for outgoing mesh calls),
:class:`~rpcmesh.errors.StatusErrorInterceptor` (rpcmesh errors raised by handlers
become precise statuses), then the user's.

Start-up problems (a bad TLS file or key pair, a port in use) raise
:class:`~rpcmesh.controlplane.component.StartupError` with one line naming the
cause and the file or port; the process entry point prints it and exits 1.
:meth:`run` handles SIGINT/SIGTERM: the first stops gracefully, a second (or a
stop running past its deadline) ends the process at once with 128 + the signal.

Telemetry: :meth:`run` (the process entry point) sets it up from the standard
``OTEL_*`` variables and shuts it down on stop; an embedding application that
manages telemetry itself uses :meth:`start`/:meth:`stop` and passes ``telemetry``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rpcmesh.controlplane.component import StartupError
from rpcmesh.controlplane.reflection import add_reflection
from rpcmesh.controlplane.server import bind_problem, check_key_pair
from rpcmesh.errors import StatusErrorInterceptor
from rpcmesh.host.config import ServiceHostConfig
from rpcmesh.host.interceptors import CallContextInterceptor
from rpcmesh.host.lease import LeaseKeeper
from rpcmesh.host.signals import ShutdownSignals
from rpcmesh.security.client import ClientSecurity
from rpcmesh.security.settings import ServerSecurity
from rpcmesh.telemetry.config import TelemetryConfig
from rpcmesh.telemetry.correlation import install_log_correlation
from rpcmesh.telemetry.grpc_aio import AioServerTracingInterceptor
from rpcmesh.telemetry.setup import Telemetry, get_telemetry, setup_telemetry
from rpcmesh.v1 import registry_pb2

__all__ = ["ServiceHost"]

logger = logging.getLogger(__name__)

_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class _RecordingServer:
    """Forwards to the real server and notes the service names a generated ``add_*_to_server`` adds."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self.names: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        for handler in handlers:
            name = getattr(handler, "service_name", None)
            if callable(name) and name() not in self.names:
                self.names.append(name())
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: dict[str, Any]) -> None:
        if service_name not in self.names:
            self.names.append(service_name)
        self._server.add_registered_method_handlers(service_name, handlers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class ServiceHost:
    """Runs servicers on one grpc.aio server and keeps the instance registered.

    Attributes:
        address: The bound ``host:port`` once started (the registered address may
            use ``advertise_host``).
        service_names: Full names of the served gRPC services.
    """

    def __init__(
        self,
        config: ServiceHostConfig,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
        drain_delay: float = 0.5,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.config = config
        self._telemetry = telemetry
        self._owned_telemetry: Telemetry | None = None
        self.security: ServerSecurity | None = None
        self._user_interceptors = list(interceptors)
        self._options = list(options)
        self._drain_delay = drain_delay
        self._adders: list[tuple[Callable[[Any, Any], None], Any, Sequence[str]]] = []
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._lease: LeaseKeeper | None = None
        self._stopped = False
        self._stopped_event = asyncio.Event()
        self.address = ""
        self.service_names: list[str] = []

    @property
    def instance_id(self) -> str:
        """The registered instance id ('' before registration or when not registering)."""
        return self._lease.instance_id if self._lease else self.config.instance_id

    @property
    def lease(self) -> LeaseKeeper | None:
        """The lease keeper, once started with registration on."""
        return self._lease

    def add_servicer(
        self,
        add_to_server: Callable[[Any, Any], None],
        servicer: Any,
        *,
        service_names: Sequence[str] = (),
    ) -> None:
        """Serve ``servicer`` through its generated ``add_XServicer_to_server`` function.

        Args:
            add_to_server: e.g. ``echo_pb2_grpc.add_EchoServicer_to_server``.
            servicer: The servicer instance.
            service_names: Full service names for health and reflection; found
                automatically for generated code.
        """
        if self._server is not None:
            raise RuntimeError("add_servicer: the host is already started")
        self._adders.append((add_to_server, servicer, tuple(service_names)))

    async def start(self) -> str:
        """Bind, start serving and register; returns the bound ``host:port``.

        A start that fails stops what it started (as :meth:`stop` does).

        Raises:
            StartupError: one line naming the cause and the file or port (bad TLS
                files, a certificate and key that do not match, a port in use).
        """
        if self._stopped:
            raise RuntimeError("start: the host was stopped; create a new one")
        if self._server is not None:
            raise RuntimeError("start: the host is already started")
        # Reads certificates and the token secret now: a bad file fails the start.
        try:
            security = ServerSecurity.build(self.config.security, authorize=False)
        except ValueError as exc:
            raise StartupError(" ".join(str(exc).split())) from exc
        check_key_pair(security)
        self.security = security
        try:
            return await self._start(security)
        except BaseException:
            await asyncio.shield(self.stop(0))
            raise

    async def _start(self, security: ServerSecurity) -> str:
        server = grpc.aio.server(
            interceptors=[
                *security.interceptors,
                AioServerTracingInterceptor(self._telemetry),
                CallContextInterceptor(),
                StatusErrorInterceptor(),
                *self._user_interceptors,
            ],
            options=[*security.options, *self._options],
            maximum_concurrent_rpcs=security.maximum_concurrent_rpcs,
        )
        recorder = _RecordingServer(server)
        for add_to_server, servicer, names in self._adders:
            add_to_server(servicer, recorder)
            for name in names:
                if name not in recorder.names:
                    recorder.names.append(name)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.service_names = [*recorder.names, _HEALTH_SERVICE]
        add_reflection(self.service_names, server)
        # Stopped by stop() from here on, even if binding fails.
        self._server = server
        where = f"{self.config.host}:{self.config.port}"
        if self.config.port:
            # grpc binds with SO_REUSEPORT (a second server could share the port) and logs
            # its failures in several lines: check first, and say why in one.
            problem = bind_problem(self.config.host, self.config.port)
            if problem is not None:
                raise StartupError(f"cannot listen on {where}: {problem}")
        try:
            port = security.add_port(server, where)
        except RuntimeError:
            port = 0
        if port == 0:
            problem = bind_problem(self.config.host, self.config.port) or "the gRPC server could not bind it"
            raise StartupError(f"cannot listen on {where}: {problem}")
        self.address = f"{self.config.host}:{port}"
        await server.start()
        for name in ("", *self.service_names):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.register:
            instance = registry_pb2.Instance(
                service=self.config.service,
                instance_id=self.config.instance_id,
                address=self.config.advertised(port),
                version=self.config.version,
                zone=self.config.zone,
                tags=list(self.config.tags),
                metadata=dict(self.config.metadata),
            )
            registry_security = self.config.registry_security
            if registry_security is None:
                registry_security = ClientSecurity.from_env()
            self._lease = LeaseKeeper(
                instance, ttl=self.config.ttl, registries=self.config.registries, security=registry_security
            )
            await self._lease.start()
        logger.info("%s serving %s on %s", self.config.service, ", ".join(self.service_names), self.address)
        return self.address

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, deregister, drain in-flight calls within ``grace`` and stop."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace if grace is None else grace
        try:
            await self._health.enter_graceful_shutdown()
            if self._lease is not None:
                await self._lease.stop(deregister=True)
                if self._drain_delay > 0 and self._server is not None:
                    # Clients learn of the deregistration through their watch; keep
                    # accepting calls meanwhile so none is turned away.
                    await asyncio.sleep(min(self._drain_delay, grace))
            if self._server is not None:
                await self._server.stop(grace)
            logger.info("%s on %s stopped", self.config.service, self.address)
        finally:
            self._stopped_event.set()
            if self._owned_telemetry is not None:
                telemetry, self._owned_telemetry = self._owned_telemetry, None
                # Flushing exports over the network: keep it off the event loop.
                await asyncio.to_thread(telemetry.shutdown)

    async def wait(self) -> None:
        """Block until :meth:`stop` has stopped the host (or a start failed); cancelling it is safe.

        Not ``server.wait_for_termination()``: cancelling that cancels the server's own
        shutdown future, and ``server.stop(grace)`` then skips the grace period (in-flight
        calls are cut off) and raises CancelledError.
        """
        await self._stopped_event.wait()

    async def run(self, *, print_address: bool = True, shutdown_deadline: float | None = None) -> None:
        """Start, print ``listening on HOST:PORT``, serve until SIGTERM/SIGINT, then stop gracefully.

        The process entry point: a second SIGTERM/SIGINT during the stop, or a stop still
        running ``shutdown_deadline`` seconds after the first signal (default: the drain
        delay and ``config.grace`` plus 15 s for deregistering and flushing telemetry),
        ends the process at once with exit code 128 + the signal number.

        Raises:
            StartupError: the host could not start (see :meth:`start`); the caller
                prints its one line and exits 1.

        Also the process's telemetry: set up from the ``OTEL_*`` variables (service name
        defaults to the registered service name) unless a handle was given or one is
        installed already; the correlation id is added to every log record.
        """
        install_log_correlation()
        if self._telemetry is None and not get_telemetry().active:
            named = "OTEL_SERVICE_NAME" in os.environ or "service.name" in os.environ.get(
                "OTEL_RESOURCE_ATTRIBUTES", ""
            )
            overrides = {} if named else {"service_name": self.config.service}
            self._owned_telemetry = setup_telemetry(TelemetryConfig.from_env(None, **overrides))
        if shutdown_deadline is None:
            shutdown_deadline = self._drain_delay + self.config.grace + 15.0
        stop_requested = asyncio.Event()
        async with ShutdownSignals(stop_requested.set, deadline=shutdown_deadline, name=self.config.service):
            try:
                await self.start()
                if print_address:
                    assert self.security is not None
                    for line in self.security.warnings(self.address):
                        print(line, file=sys.stderr, flush=True)
                    print(f"{self.config.service} listening on {self.address}", flush=True)
                await stop_requested.wait()
            finally:
                await asyncio.shield(self.stop())

    async def __aenter__(self) -> ServiceHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
