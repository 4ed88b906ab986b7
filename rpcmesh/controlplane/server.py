"""The control-plane server: components on one grpc.aio server, with health and reflection.

Lifecycle (see docs/operations.md): :meth:`ControlPlane.start` takes the data folder's lock
(one control plane per folder), binds and starts the components; :meth:`ControlPlane.stop`
shuts down in order within a bounded time: stop accepting calls, end every open stream with
UNAVAILABLE (clients reconnect elsewhere or later), let unary calls finish within the grace
period, then stop the components (flush group state, close stores), each within
``config.close_timeout``. Start-up problems raise :class:`StartupError`, one line naming the
cause and the file or port.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import sqlite3
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rpcmesh.controlplane.component import Component, ControlPlaneContext, StartupError
from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.controlplane.reflection import add_reflection
from rpcmesh.errors import UnavailableError
from rpcmesh.security.settings import ServerSecurity
from rpcmesh.tasks import stop_tasks
from rpcmesh.telemetry.aio_server import trace_aio_server
from rpcmesh.telemetry.config import TelemetryConfig
from rpcmesh.telemetry.correlation import install_log_correlation
from rpcmesh.telemetry.setup import setup_telemetry

logger = logging.getLogger(__name__)

LOCK_FILE = "rpcmesh.lock"
"""The file in the data folder a control plane holds an exclusive ``flock`` on while it runs."""

SHUTTING_DOWN = "control plane is shutting down"


def build_components(config: ControlPlaneConfig) -> list[Component]:
    """The components `rpcmesh up` serves for this configuration."""
    # Imported here: each component pulls in its storage drivers (psycopg, nats-py).
    from rpcmesh.controlplane.bus.caps import BusCaps
    from rpcmesh.controlplane.bus.component import BusComponent
    from rpcmesh.controlplane.eventstore.component import EventStoreComponent
    from rpcmesh.controlplane.registry.component import RegistryComponent
    from rpcmesh.controlplane.registry.settings import RegistrySettings
    from rpcmesh.controlplane.saga.component import SagaCoordinatorComponent

    eventstore = EventStoreComponent(config)
    return [
        RegistryComponent(config, RegistrySettings(address_policy=config.address_policy)),
        BusComponent(
            config, caps=BusCaps(max_topics=config.bus_max_topics, max_groups=config.bus_max_groups)
        ),
        eventstore,
        SagaCoordinatorComponent(config, eventstore=eventstore),
    ]


# -- one control plane per data folder ------------------------------------------------


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/rpcmesh.lock``, holding the owner's PID.

    The kernel releases a ``flock`` when its process dies (even by kill -9), so a restart
    after a crash takes the lock at once; the PID in the file only names the holder.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StartupError` naming the folder (and the holder's PID)."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupError(f"cannot use data folder {self.data_dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StartupError(
                    f"data folder {self.data_dir} is in use by another control plane (PID {holder})"
                ) from exc
            raise StartupError(f"cannot lock {self.path}: {exc.strerror}") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StartupError(f"cannot write {self.path}: {exc.strerror}") from exc
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (closing the file releases it); idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def bind_problem(host: str, port: int) -> str | None:
    """Why host:port cannot be listened on, as the operating system says it; None if it can."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return str(exc.strerror or exc)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As a server binds (TIME_WAIT connections of an earlier run do not block it).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return str(exc.strerror or exc)
    return None


def check_key_pair(security: ServerSecurity) -> None:
    """Fail with the file names when the TLS certificate and key do not belong together."""
    tls = security.settings.tls
    if tls is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.cert_file, tls.key_file)
    except ssl.SSLError as exc:
        raise StartupError(
            f"TLS certificate {tls.cert_file} and key {tls.key_file} do not match or are not PEM "
            f"({exc.reason or exc})"
        ) from exc
    except OSError as exc:
        raise StartupError(f"cannot read TLS files {tls.cert_file}, {tls.key_file}: {exc.strerror}") from exc


# -- ending open streams on shutdown --------------------------------------------------


class StreamTracker:
    """Knows every open streaming call, so that shutdown can end them at once.

    Wraps each streaming handler as it is registered (innermost, nearest the servicer). An
    idle stream (a subscriber waiting for messages, a registry watch) would otherwise hold
    ``server.stop(grace)`` for the whole grace period and be cancelled without a status.
    :meth:`end_streams` cancels each one inside its handler, so the handler's own cleanup runs
    (a Bus subscription leaves its group, its acks are kept), and the call ends with
    UNAVAILABLE, which clients treat as "reconnect".
    """

    def __init__(self) -> None:
        self._open: set[asyncio.Task[Any]] = set()
        self._ending: set[asyncio.Task[Any]] = set()
        self._inside: set[asyncio.Task[Any]] = set()
        """Streams whose handler task is inside the servicer's generator (safe to cancel)."""
        self._whole: set[asyncio.Task[Any]] = set()
        """Request-streaming calls with one response: always inside the servicer."""
        self.closing = False

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` with its streaming behaviour tracked (unary handlers are returned as they are)."""
        if not (handler.request_streaming or handler.response_streaming):
            return handler
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._generator(handler.stream_stream), **serializers
            )
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(self._generator(handler.unary_stream), **serializers)
        return grpc.stream_unary_rpc_method_handler(self._coroutine(handler.stream_unary), **serializers)

    def _enter(self) -> asyncio.Task[Any]:
        if self.closing:
            raise UnavailableError(SHUTTING_DOWN)
        task = asyncio.current_task()
        assert task is not None
        self._open.add(task)
        return task

    def _ended_by_shutdown(self, task: asyncio.Task[Any]) -> bool:
        if task in self._ending and task.cancelling():
            task.uncancel()
            return True
        return False

    def _generator(self, behavior: Any) -> Callable[[Any, Any], Any]:
        async def tracked(request: Any, context: Any) -> Any:
            task = self._enter()
            try:
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    while not self.closing:
                        # Cancelled only in here, inside the servicer: a cancel that lands in
                        # grpc's own send code (while this generator waits at its yield) ends
                        # the call without a status and holds server.stop for its grace period.
                        self._inside.add(task)
                        try:
                            response = await anext(responses)
                        except StopAsyncIteration:
                            return
                        finally:
                            self._inside.discard(task)
                        yield response
                raise UnavailableError(SHUTTING_DOWN)
            except asyncio.CancelledError:
                if self._ended_by_shutdown(task):
                    raise UnavailableError(SHUTTING_DOWN) from None
                raise
            finally:
                self._open.discard(task)

        return tracked

    def _coroutine(self, behavior: Any) -> Callable[[Any, Any], Any]:
        async def tracked(request: Any, context: Any) -> Any:
            task = self._enter()
            self._whole.add(task)
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                if self._ended_by_shutdown(task):
                    raise UnavailableError(SHUTTING_DOWN) from None
                raise
            finally:
                self._open.discard(task)
                self._whole.discard(task)

        return tracked

    async def end_streams(self, within: float) -> None:
        """Refuse new streams, end the open ones and wait (at most ``within`` s) for their cleanup.

        A stream waiting inside its servicer is cancelled there; one whose response is being
        sent ends when it asks its servicer for the next one.
        """
        self.closing = True
        tasks = set(self._open)
        for task in tasks:
            if task in self._inside or task in self._whole:
                self._ending.add(task)
                task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=within)
            if pending:
                logger.warning("%d stream(s) still ending after %.1fs; going on", len(pending), within)


class _TrackingGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, handler: grpc.GenericRpcHandler, tracker: StreamTracker) -> None:
        self._handler = handler
        self._tracker = tracker
        self._wrapped: dict[int, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._handler.service(handler_call_details)
        if handler is None:
            return None
        cached = self._wrapped.get(id(handler))
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._tracker.wrap(handler)
        self._wrapped[id(handler)] = (handler, wrapped)
        return wrapped


class _TrackingServer:
    """A ``grpc.aio.Server`` proxy that registers every handler through a :class:`StreamTracker`."""

    def __init__(self, server: Any, tracker: StreamTracker) -> None:
        self.inner = server
        self._tracker = tracker

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.inner.add_generic_rpc_handlers(
            [_TrackingGenericHandler(handler, self._tracker) for handler in generic_rpc_handlers]
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.inner.add_registered_method_handlers(
            service_name, {name: self._tracker.wrap(handler) for name, handler in method_handlers.items()}
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# -- the server -----------------------------------------------------------------------


def _uses_data_dir(config: ControlPlaneConfig) -> bool:
    return config.store is None or config.bus is None


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
        self._streams = StreamTracker()
        self._lock = DataDirLock(config.data_dir)
        self._stopping = asyncio.Event()
        self.address = ""
        self.security: ServerSecurity | None = None
        self._http: Any = None
        self.http_url = ""
        """``http(s)://host:port`` of the HTTP API and console (docs/http-api.md); empty when off."""

    @property
    def service_names(self) -> list[str]:
        """Every gRPC service this process serves."""
        names = [name for component in self.components for name in component.service_names]
        return [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]

    async def start(self) -> str:
        """Lock the data folder, bind, start every component and serve; returns the bound host:port.

        Raises:
            StartupError: one line naming the cause and the file, folder or port.
        """
        # Reads certificates, token secret and policy now: a bad file fails the start.
        try:
            security = ServerSecurity.build(self.config.security)
        except ValueError as exc:
            message = " ".join(str(exc).split())
            policy = self.config.security.policy_file
            if policy is not None and message.startswith("policy") and str(policy) not in message:
                message = f"policy file {policy}: {message.removeprefix('policy').lstrip(': ')}"
            raise StartupError(message) from exc
        check_key_pair(security)
        self.security = security
        if _uses_data_dir(self.config):
            self._lock.acquire()
        try:
            await self._start(security)
        except BaseException:
            await self.stop()
            raise
        for name in ("", *self.service_names):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("control plane serving %s on %s", ", ".join(self.service_names), self.address)
        return self.address

    async def _start(self, security: ServerSecurity) -> None:
        # No server interceptors: with any, grpc.aio looks every call's handler up through an
        # interceptor coroutine chain. Each handler is wrapped once, at registration, by three
        # proxies; the one nearer the server wraps outermost. Outermost, the security guard
        # (refused calls cost the least; it also maps rpcmesh StatusErrors to their status, so
        # no StatusErrorInterceptor layer), then tracing (SERVER spans, correlation id; it
        # records a StatusError's precise code itself), innermost the stream tracker.
        server = grpc.aio.server(
            options=security.options,
            maximum_concurrent_rpcs=security.maximum_concurrent_rpcs,
        )
        self._server = server
        # The HTTP API runs the very handlers the server gets (after every wrapper): record them.
        recorder: Any = None
        if self.config.http_port is not None:
            from rpcmesh.http import HandlerRecorder

            recorder = HandlerRecorder(server)
        registrar = cast(
            grpc.aio.Server,
            _TrackingServer(trace_aio_server(security.guarded(recorder or server)), self._streams),
        )
        for component in self.components:
            component.add_to_server(registrar)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, registrar)
        # Reflection v1 and v1alpha, with the aio servicer (a proxy would get the sync one).
        add_reflection(self.service_names, registrar)
        if self.config.port:
            # grpc binds with SO_REUSEPORT (a second server could share the port) and logs its
            # failures in several lines: check first, and say why in one.
            problem = bind_problem(self.config.host, self.config.port)
            if problem is not None:
                raise StartupError(f"cannot listen on {self.config.address}: {problem}")
        try:
            port = security.add_port(server, self.config.address)
        except RuntimeError:
            port = 0
        if port == 0:
            problem = bind_problem(self.config.host, self.config.port) or "the gRPC server could not bind it"
            raise StartupError(f"cannot listen on {self.config.address}: {problem}")
        self.address = f"{self.config.host}:{port}"
        context = ControlPlaneContext(config=self.config, address=self.address)
        for name in ("", *self.service_names):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        for component in self.components:
            try:
                await component.start(context)
            except sqlite3.DatabaseError as exc:
                # sqlite3 never names the file; the components that know it name it themselves.
                raise StartupError(
                    f"{type(component).__name__}: cannot open its database in {self.config.data_dir}: {exc}"
                ) from exc
            self._started.append(component)
        await server.start()
        if recorder is not None:
            await self._start_http(security, recorder)

    async def _start_http(self, security: ServerSecurity, recorder: Any) -> None:
        from rpcmesh.http import HttpServer, build_http_app, console_info

        settings = security.settings
        assert self.config.http_port is not None
        self._http = HttpServer(
            host=self.config.http_host or self.config.host,
            port=self.config.http_port,
            tls=settings.tls,
            graceful_timeout=self.config.grace,
            port_fallback=self.config.http_port_fallback,
        )
        app = build_http_app(
            recorder,
            self.service_names,
            read_max_bytes=settings.limits.max_receive_message_bytes,
            info=console_info(
                store=self.config.store,
                bus=self.config.bus,
                grpc_address=self.address,
                token_auth=settings.token_secret_file is not None,
                certificate_auth=settings.tls is not None and settings.tls.client_auth,
            ),
            common_name_of=self._http.common_name_of,
        )
        self.http_url = await self._http.start(app)

    async def stop(self) -> None:
        """Shut down in order, each step bounded; idempotent.

        Report NOT_SERVING and stop accepting calls; end open streams (UNAVAILABLE); let unary
        calls finish within ``config.grace`` (then they are cancelled); stop the components in
        reverse order (flush state, close stores), each within ``config.close_timeout``; release
        the data folder.
        """
        self._stopping.set()
        try:
            await self._health.enter_graceful_shutdown()
            server, self._server = self._server, None
            if server is not None:
                # server.stop stops accepting at once; it returns once every call has ended
                # or, after the grace period, has been cancelled.
                stopping = asyncio.ensure_future(server.stop(self.config.grace))
                if self._http is not None:
                    self._http.begin_stop()
                await asyncio.sleep(0)
                await self._streams.end_streams(self.config.grace)
                logger.info("shutdown: open streams ended")
                if self._http is not None:
                    await self._http.stop()
                    logger.info("shutdown: HTTP server stopped")
                await asyncio.wait({stopping})
                logger.info("shutdown: gRPC server stopped")
                if not stopping.cancelled() and stopping.exception() is not None:
                    logger.error("stopping the gRPC server failed", exc_info=stopping.exception())
            for component in reversed(self._started):
                await self._stop_component(component)
            self._started.clear()
        finally:
            self._lock.release()

    async def _stop_component(self, component: Component) -> None:
        name = type(component).__name__
        task = asyncio.ensure_future(component.stop())
        try:
            done, _ = await asyncio.wait({task}, timeout=self.config.close_timeout)
            if not done:
                logger.error("stopping %s took over %.1fs; abandoning it", name, self.config.close_timeout)
                await stop_tasks([task])
            elif not task.cancelled() and task.exception() is not None:
                logger.error("stopping %s failed", name, exc_info=task.exception())
        except asyncio.CancelledError:
            await stop_tasks([task])
            raise

    async def wait(self) -> None:
        """Block until :meth:`stop` is called (or the start failed); cancelling it is safe.

        Not ``server.wait_for_termination()``: cancelling that cancels the server's own
        shutdown future, and ``server.stop(grace)`` then skips the grace period and raises
        CancelledError, so the components were never stopped (group state not flushed).
        """
        await self._stopping.wait()


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
        if plane.http_url:
            print(f"rpcmesh HTTP API and console at {plane.http_url}/", flush=True)
        if ready is not None:
            ready.set()
        await plane.wait()
    finally:
        try:
            await asyncio.shield(plane.stop())
        finally:
            await asyncio.to_thread(telemetry.shutdown)
