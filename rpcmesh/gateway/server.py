"""The gateway server: accepts any method and forwards it through the mesh client stack.

Server interceptors, outermost first: security (TLS/mTLS, tokens, limits from
``GatewayConfig.security``), tracing (a SERVER span continuing the caller's
``traceparent``; the mesh call and its attempts become its children, so the
trace goes on through the gateway), then :class:`~rpcmesh.errors.StatusErrorInterceptor`.
The caller's ``authorization`` header is not forwarded: the gateway calls
backends under its own identity (the Mesh's ``ClientSecurity``).

Authorization (:mod:`rpcmesh.gateway.access`): each call's target is resolved
first, then the caller's identity needs a grant for ``<service>/<Method>`` in the
access policy (``GatewayConfig.security.policy_file``, control-plane format:
``calls`` globs, ``admins``). With authentication on and no policy every call is
refused unless ``GatewayConfig.allow_any_identity`` is set. A refused call is
PERMISSION_DENIED naming the identity and the target, and reaches no backend (not
even the shape lookup).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rpcmesh.controlplane.component import StartupError
from rpcmesh.controlplane.server import bind_problem, check_key_pair
from rpcmesh.errors import PermissionDeniedError, StatusError, StatusErrorInterceptor
from rpcmesh.gateway.access import GatewayAccess
from rpcmesh.gateway.routes import HttpRoutes, RouteTable, split_method
from rpcmesh.gateway.shapes import Shape, ShapeCache
from rpcmesh.host.config import HOST_LIMITS
from rpcmesh.security.identity import AUTHORIZATION_KEY, Identity
from rpcmesh.security.interceptor import current_identity
from rpcmesh.security.policy import load_policy
from rpcmesh.security.settings import OPEN_POLICY_WARNING, SecuritySettings, ServerSecurity
from rpcmesh.telemetry.grpc_aio import AioServerTracingInterceptor

logger = logging.getLogger(__name__)

_HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
_HOP_HEADERS = frozenset({"user-agent", "content-type", "te", AUTHORIZATION_KEY})


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """Where the gateway listens, where the Registry is, and how methods are routed."""

    registry: Sequence[str]
    """Registry host:port address(es)."""

    host: str = "127.0.0.1"
    """Interface to listen on."""

    port: int = 0
    """Port to listen on; 0 picks a free one."""

    routes: RouteTable = field(default_factory=RouteTable)
    """gRPC service -> registered service name."""

    grace: float = 5.0
    """Seconds in-flight calls get to finish on shutdown."""

    security: SecuritySettings = field(default_factory=lambda: SecuritySettings(limits=HOST_LIMITS))
    """How the gateway's port is protected (TLS/mTLS, accepted tokens, limits); default plaintext.

    Its ``policy_file`` is the access policy: who may call which ``service/Method`` through the
    gateway (control-plane policy format; needs authentication)."""

    allow_any_identity: bool = False
    """With authentication on and no access policy, let every authenticated identity call every
    service. Off by default: then every call is refused (PERMISSION_DENIED)."""

    http_port: int | None = None
    """Port of the HTTP/JSON (Connect protocol) ingress on :attr:`host`; 0 picks a free one;
    None (the default): no HTTP ingress (:mod:`rpcmesh.gateway.http_ingress`)."""

    http_routes: HttpRoutes = field(default_factory=HttpRoutes)
    """HTTP path prefixes -> registered service names (``/api/users`` -> ``users``)."""

    def __post_init__(self) -> None:
        if self.allow_any_identity and self.security.policy_file is not None:
            raise ValueError("allow_any_identity: give it or an access policy file, not both")
        if not self.registry:
            raise ValueError("registry: at least one Registry address is needed")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be 0-65535, got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port: must be 0-65535, got {self.http_port}")


def forwardable_metadata(metadata: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """The caller's metadata minus what gRPC manages per hop (grpc-*, user-agent, pseudo-headers).

    The caller's credentials (``authorization``) stay at the gateway: backends see the gateway's identity.
    """
    return tuple(
        (key, value)
        for key, value in metadata
        if not key.startswith((":", "grpc-")) and key not in _HOP_HEADERS
    )


class Forwarder:
    """Forwards one call: route, learn the shape, call through the mesh, pass errors back unchanged."""

    def __init__(
        self,
        mesh: Any,
        routes: RouteTable,
        shapes: ShapeCache | None = None,
        access: GatewayAccess | None = None,
    ) -> None:
        self._mesh = mesh
        self._routes = routes
        self._shapes = shapes or ShapeCache()
        self.access = access or GatewayAccess()
        """Who may call what; the gateway sets it at start, once the policy file is read."""

    @property
    def shapes(self) -> ShapeCache:
        """What reflection told about the backends' services (shared with the HTTP ingress)."""
        return self._shapes

    def channel(self, service_name: str) -> Any:
        """The mesh channel to a registered service (discovery, balancing, retries, breakers)."""
        return self._mesh.channel(service_name)

    def target(self, method: str, headers: Mapping[str, str], identity: Identity | None) -> str:
        """The registered service ``method`` routes to, once ``identity`` may call it there.

        Raises:
            InvalidArgumentError: the method or the ``x-rpcmesh-service`` header is malformed.
            PermissionDeniedError: the identity may not call ``<service>/<Method>``.
        """
        service_name = self._routes.resolve(method, headers)
        self.authorize(identity, service_name, split_method(method)[1])
        return service_name

    def authorize(self, identity: Identity | None, service_name: str, method_name: str) -> None:
        """PERMISSION_DENIED unless ``identity`` may call ``service_name/method_name``.

        Decided on the resolved target, before anything reaches a backend.
        """
        reason = self.access.denial(identity, service_name, method_name)
        if reason is not None:
            raise PermissionDeniedError(reason)

    async def forward(
        self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        """Proxy ``method``: yields the backend's responses, or aborts with its status."""
        incoming = tuple(context.invocation_metadata() or ())
        headers = {key: value for key, value in incoming if isinstance(value, str)}
        service_name = self.target(method, headers, current_identity.get())
        grpc_service, method_name = split_method(method)
        channel = self._mesh.channel(service_name)
        shape = await self._shapes.shape(channel, grpc_service, method_name)
        remaining = context.time_remaining()
        timeout = remaining if remaining is not None and remaining < 1e9 else None
        metadata = forwardable_metadata(incoming)
        try:
            if shape in (Shape.UNARY_UNARY, Shape.STREAM_UNARY):
                if shape is Shape.UNARY_UNARY:
                    request = await _only_request(requests)
                    call = channel.unary_unary(method)(request, timeout=timeout, metadata=metadata)
                else:
                    call = channel.stream_unary(method)(requests, timeout=timeout, metadata=metadata)
                response = await call
                context.set_trailing_metadata(tuple(await call.trailing_metadata() or ()))
                yield response
            else:
                if shape is Shape.UNARY_STREAM:
                    request = await _only_request(requests)
                    stream = channel.unary_stream(method)(request, timeout=timeout, metadata=metadata)
                else:
                    stream = channel.stream_stream(method)(requests, timeout=timeout, metadata=metadata)
                async for response in stream:
                    yield response
                context.set_trailing_metadata(tuple(await stream.trailing_metadata() or ()))
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "", tuple(error.trailing_metadata() or ()))


async def _only_request(requests: AsyncIterator[bytes]) -> bytes:
    request: bytes | None = None
    async for item in requests:
        if request is not None:
            raise StatusError(
                "a unary method got more than one request", code=grpc.StatusCode.INVALID_ARGUMENT
            )
        request = item
    if request is None:
        raise StatusError("a unary method got no request", code=grpc.StatusCode.INVALID_ARGUMENT)
    return request


class _ProxyHandler(grpc.GenericRpcHandler):
    """Serves every method not served locally as a raw-bytes bidirectional stream."""

    def __init__(self, forwarder: Forwarder) -> None:
        self._forwarder = forwarder

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method.startswith(_HEALTH_METHOD_PREFIX):
            return None
        forward = self._forwarder.forward

        async def behavior(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
        ) -> AsyncIterator[bytes]:
            async for response in forward(method, requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(behavior)


class Gateway:
    """One address for every mesh service.

    Usage::

        async with Mesh(registry=["127.0.0.1:50051"]) as mesh:
            gateway = Gateway(GatewayConfig(registry=["127.0.0.1:50051"]), mesh)
            address = await gateway.start()
    """

    def __init__(self, config: GatewayConfig, mesh: Any) -> None:
        self.config = config
        self._forwarder = Forwarder(mesh, config.routes)
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.security: ServerSecurity | None = None
        self.address = ""
        self.http: Any = None
        """The HTTP ingress (:class:`~rpcmesh.gateway.http_ingress.HttpIngress`) once started, else None."""
        self._stopping = asyncio.Event()

    async def start(self) -> str:
        """Bind and serve; returns host:port.

        Raises:
            StartupError: one line naming the cause and the file or port.
        """
        # Reads certificates and the token secret now: a bad file fails the start.
        try:
            security = ServerSecurity.build(self.config.security, authorize=False)
        except ValueError as exc:
            raise StartupError(" ".join(str(exc).split())) from exc
        check_key_pair(security)
        self._forwarder.access = self._access(security.settings)
        self.security = security
        address = f"{self.config.host}:{self.config.port}"
        if self.config.port:
            problem = bind_problem(self.config.host, self.config.port)
            if problem is not None:
                raise StartupError(f"cannot listen on {address}: {problem}")
        server = grpc.aio.server(
            interceptors=[*security.interceptors, AioServerTracingInterceptor(), StatusErrorInterceptor()],
            options=security.options,
            maximum_concurrent_rpcs=security.maximum_concurrent_rpcs,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        server.add_generic_rpc_handlers([_ProxyHandler(self._forwarder)])
        try:
            port = security.add_port(server, address)
        except RuntimeError:
            port = 0
        if port == 0:
            problem = bind_problem(self.config.host, self.config.port) or "the gRPC server could not bind it"
            raise StartupError(f"cannot listen on {address}: {problem}")
        self._server = server
        self.address = f"{self.config.host}:{port}"
        await server.start()
        if self.config.http_port is not None:
            from rpcmesh.gateway.http_ingress import HttpIngress  # connectrpc and hypercorn: only when asked

            try:
                http = HttpIngress(
                    self._forwarder, self.config.http_routes, security.settings, security.guard.tracker
                )
                await http.start(self.config.host, self.config.http_port, self.config.grace)
            except BaseException:
                self._server = None
                await server.stop(None)
                raise
            self.http = http
            logger.info("gateway HTTP (Connect) ingress at %s", http.url)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        logger.info("gateway listening on %s", self.address)
        return self.address

    def _access(self, settings: SecuritySettings) -> GatewayAccess:
        """The authorization settings, with the access policy read (a bad file is a StartupError)."""
        policy = None
        if settings.policy_file is not None:
            try:
                policy = load_policy(settings.policy_file)
            except ValueError as exc:
                raise StartupError(" ".join(str(exc).split())) from exc
        return GatewayAccess(
            authentication=settings.authentication_enabled,
            policy=policy,
            allow_any_identity=self.config.allow_any_identity,
        )

    def warnings(self, address: str) -> list[str]:
        """Lines to print loudly at start: the port's (plaintext, development mode) and the access rule."""
        if self.security is None:
            return []
        lines = [line for line in self.security.warnings(address) if line != OPEN_POLICY_WARNING]
        settings = self.security.settings
        if self.http is not None and settings.tls is None:
            lines.append(
                f"WARNING: the gateway's HTTP ingress at {self.http.url} is PLAINTEXT too: anyone on the "
                "network path can read its calls (and replay bearer tokens). Use TLS outside development."
            )
        if settings.authentication_enabled and settings.policy_file is None:
            if self.config.allow_any_identity:
                lines.append(
                    "WARNING: --allow-any-identity: every authenticated identity may call every "
                    "service through the gateway. Give --access-policy to grant least privilege."
                )
            else:
                lines.append(
                    "NOTE: authentication is on but no access policy is given: the gateway refuses "
                    "every call (PERMISSION_DENIED). Give --access-policy FILE (or --allow-any-identity)."
                )
        return lines

    async def stop(self) -> None:
        """Stop accepting calls and drain within the grace period (then cancel what is left)."""
        self._stopping.set()
        await self._health.enter_graceful_shutdown()
        if self.http is not None:
            http, self.http = self.http, None
            await http.stop()
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(self.config.grace)

    async def wait(self) -> None:
        """Block until :meth:`stop` is called; cancelling it is safe.

        Not ``server.wait_for_termination()``: cancelling that cancels the server's own shutdown
        future, and ``server.stop(grace)`` then skips the grace period.
        """
        await self._stopping.wait()
