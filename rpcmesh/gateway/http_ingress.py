"""HTTP/JSON ingress at the gateway: the Connect protocol for every registered service.

``rpcmesh gateway --http-port N`` serves, beside the gRPC port, the Connect protocol
(JSON and binary, unary and streaming, HTTP/1.1 and h2c; gRPC-Web too) for any service
registered in the mesh, built at runtime from the service's reflection descriptors: no
code generation per service. Two kinds of path reach a method:

- the protocol's own ``/package.Service/Method``, routed to a registered service as the
  gRPC side routes it (``--route GRPC_SERVICE=NAME``, the ``x-rpcmesh-service`` header,
  the lowercased simple name);
- path routes ``--route /api/users=users``: ``/api/users/GetUser`` calls ``GetUser`` of
  whichever gRPC service of the ``users`` backend has it.

Each request goes through, in order (refusals are Connect errors written by ``connectrpc``,
see :class:`~rpcmesh.gateway.http_calls.ErrorApp`):

1. HTTP checks: POST only (405), and the control plane's CSRF rule
   (:func:`rpcmesh.http.app.csrf_refusal`): a request whose ``Origin`` is not the gateway's
   own origin, or whose content type is not a Connect, gRPC or gRPC-Web one (a form POST),
   is PERMISSION_DENIED (403) and reaches no handler;
2. authentication, with the gateway's own settings (the same
   :class:`~rpcmesh.security.identity.Authenticator` rules as its gRPC port): a bearer token
   in ``Authorization``, else, with ``--tls-client-auth``, the common name of the client
   certificate the connection presented (the HTTP server's TLS front tells which);
   then the calls in flight per connection and per identity are counted against the gRPC
   port's limits (the same counters for the identity: RESOURCE_EXHAUSTED over them);
3. routing and per-target authorization: the same
   :meth:`~rpcmesh.gateway.server.Forwarder.target` / ``authorize`` as the gRPC side, before
   anything reaches a backend (unknown path: NOT_FOUND, HTTP 404);
4. a SERVER span continuing the caller's ``traceparent``, and the correlation id
   (``x-correlation-id``, adopted or created, sent back as a response header);
5. the service's descriptors (the gateway's :class:`~rpcmesh.gateway.shapes.ShapeCache`,
   once per gRPC service) and its Connect application (cached), whose endpoint forwards
   through the mesh channel: discovery, balancing, retries, breakers and the caller's
   deadline (``connect-timeout-ms``).

The server is the control plane's :class:`~rpcmesh.http.server.HttpServer` (hypercorn in the
gateway's event loop; HTTP/1.1 and h2c in plaintext, h2/HTTP/1.1 by ALPN with TLS).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from connectrpc.server import ConnectASGIApplication
from opentelemetry import context as otel_context

from rpcmesh.errors import (
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    StatusError,
    UnauthenticatedError,
)
from rpcmesh.gateway.http_calls import (
    ErrorApp,
    HttpCall,
    connect_error,
    current_call,
    forwardable_headers,
    service_app,
)
from rpcmesh.gateway.routes import HttpRoutes
from rpcmesh.gateway.server import Forwarder
from rpcmesh.gateway.shapes import ServiceSchema
from rpcmesh.http.app import csrf_refusal, serve_lifespan, until_disconnect
from rpcmesh.http.server import HttpServer
from rpcmesh.security.identity import AuthenticationError, Authenticator, Identity
from rpcmesh.security.limits import ConcurrencyTracker
from rpcmesh.security.settings import SecuritySettings
from rpcmesh.security.tokens import load_secret
from rpcmesh.telemetry._calls import CallRecord, begin_server_call, set_peer
from rpcmesh.telemetry.correlation import CORRELATION_METADATA_KEY, reset_correlation_id, set_correlation_id
from rpcmesh.telemetry.setup import get_telemetry

__all__ = ["HttpIngress"]

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_UNARY_TYPES = frozenset({"application/json", "application/proto"})
_STREAM_TYPE_PREFIXES = ("application/connect+", "application/grpc-web", "application/grpc+")
# HTTP statuses of a response no endpoint wrote (the library refused the request), for the span.
_CODE_BY_HTTP_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


class HttpIngress:
    """The ASGI application (a router in front of one cached Connect app per gRPC service) and its server.

    Args:
        forwarder: The gateway's forwarder: routing, authorization, mesh channels, shapes.
        routes: HTTP path-prefix routes.
        security: The gateway's security settings (tokens, TLS, limits).
        tracker: The gRPC port's concurrency counters, so that the per-identity limits count the
            calls of both ports (None: counters of its own).
    """

    def __init__(
        self,
        forwarder: Forwarder,
        routes: HttpRoutes,
        security: SecuritySettings,
        tracker: ConcurrencyTracker | None = None,
    ) -> None:
        self._forwarder = forwarder
        self._tracker = tracker or ConcurrencyTracker(security.limits)
        self._routes = routes
        self._settings = security
        secret = load_secret(security.token_secret_file) if security.token_secret_file is not None else None
        self._authenticator = Authenticator(
            token_secret=secret,
            token_issuer=security.token_issuer,
            accept_certificates=security.tls is not None and security.tls.client_auth,
        )
        self._authenticating = security.authentication_enabled
        self._apps: dict[str, ConnectASGIApplication[None]] = {}
        self._errors = ErrorApp()
        self._server: HttpServer | None = None
        self.address = ""
        """host:port once started."""
        self.url = ""
        """``http://host:port`` (``https`` with TLS) once started."""

    # The server.

    async def start(self, host: str, port: int, grace: float) -> str:
        """Bind ``host:port`` (0: a free port) and serve; returns host:port.

        The server is the control plane's HTTP server (:class:`~rpcmesh.http.server.HttpServer`:
        hypercorn, h2c, TLS, and with client authentication a TLS front that tells which
        certificate each connection presented).

        Raises:
            StartupError: the port cannot be bound, or the TLS files cannot be used.
        """
        server = HttpServer(host=host, port=port, tls=self._settings.tls, graceful_timeout=grace)
        self.url = await server.start(self)
        self._server = server
        self.address = self.url.split("://", 1)[1]
        return self.address

    async def stop(self) -> None:
        """Stop accepting requests; in-flight ones get the grace period."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop()

    # The ASGI application.

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """Serve one ASGI connection event (lifespan or an HTTP request)."""
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = [
            (key.decode("latin-1").lower(), value.decode("latin-1")) for key, value in scope["headers"]
        ]
        first: dict[str, str] = {}
        for key, value in headers:
            first.setdefault(key, value)
        if scope["method"] != "POST":
            await _plain(send, 405, [(b"allow", b"POST")])
            return
        media_type = _media_type(first.get("content-type", ""))
        streaming = media_type == "application/grpc" or media_type.startswith(_STREAM_TYPE_PREFIXES)
        if not streaming and media_type not in _UNARY_TYPES:
            # Not a Connect, gRPC or gRPC-Web request (a form POST...): refused as the control plane does.
            reason = csrf_refusal(scope) or "not a Connect, gRPC or gRPC-Web content type"
            await _refused(send, reason)
            return
        await self._serve(scope, receive, send, headers, first, streaming)

    async def _serve(
        self,
        scope: dict[str, Any],
        receive: Receive,
        send: Send,
        headers: list[tuple[str, str]],
        first: dict[str, str],
        streaming: bool,
    ) -> None:
        path: str = scope["path"]
        call = HttpCall()
        call_token = current_call.set(call)
        record: CallRecord | None = None
        trace_token: object | None = None
        correlation_token = None
        status: list[int] = []

        receive, send = until_disconnect(receive, send)

        async def recording_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
                if call.correlation:  # every answer names its correlation id, refusals too
                    message = {**message, "headers": [*message.get("headers", ()), _correlation_header(call)]}
            await send(message)

        try:
            routed = self._routes.match(path)
            telemetry = get_telemetry()
            if telemetry.propagate_correlation:
                span_method = f"/{routed[0]}/{routed[1]}" if routed else _grpc_path(path) or "unknown"
                record = begin_server_call(telemetry, span_method, headers)
                client = scope.get("client")
                if record.span is not None and client:
                    set_peer(record, f"{client[0]}:{client[1]}")
                if record.context is not None:
                    trace_token = otel_context.attach(record.context)
                correlation_token = set_correlation_id(record.correlation)
                call.correlation = record.correlation
            try:
                app, inner_path = await self._resolve(scope, path, routed, headers, first, call)
            except (StatusError, grpc.aio.AioRpcError) as error:
                call.error = connect_error(error)
                app, inner_path = (self._errors.streaming if streaming else self._errors.unary), ErrorApp.PATH
                call.code = _code_of(error)
            await app(
                {**scope, "path": inner_path, "raw_path": inner_path.encode(), "root_path": ""},
                receive,
                recording_send,
            )
        finally:
            self._release(call)
            if record is not None:
                code = call.code
                if code is None:
                    code = (
                        grpc.StatusCode.OK
                        if status and status[0] < 300
                        else _CODE_BY_HTTP_STATUS.get(status[0] if status else 0, grpc.StatusCode.UNKNOWN)
                    )
                record.finish(code, call.error.message if call.error is not None else None)
            if correlation_token is not None:
                reset_correlation_id(correlation_token)
            if trace_token is not None:
                otel_context.detach(trace_token)  # type: ignore[arg-type]
            current_call.reset(call_token)

    async def _resolve(
        self,
        scope: dict[str, Any],
        path: str,
        routed: tuple[str, str] | None,
        headers: list[tuple[str, str]],
        first: dict[str, str],
        call: HttpCall,
    ) -> tuple[Any, str]:
        """The Connect app and the path within it that serve this request; raises the refusals."""
        refusal = csrf_refusal(scope)  # the control plane's rule: another origin is refused
        if refusal is not None:
            raise PermissionDeniedError(refusal)
        identity = self._authenticate(scope, headers)
        self._admit(scope, identity, call)
        if routed is not None:
            service, method_name = routed
            self._forwarder.authorize(identity, service, method_name)
            grpc_service = await self._service_with(service, method_name)
            full_method = f"/{grpc_service}/{method_name}"
        else:
            full_method = _grpc_path(path) or ""
            if not full_method:
                raise NotFoundError(
                    f"no method at {path!r}: expected /package.Service/Method or a --route path"
                )
            service = self._forwarder.target(full_method, first, identity)
            grpc_service, method_name = full_method[1:].split("/")
        call.service = service
        call.metadata = forwardable_headers(headers)
        schema = await self._schema(service, grpc_service)
        if schema is None or schema.method(method_name) is None:
            raise NotFoundError(f"{service} does not serve {full_method}")
        app = self._apps.get(grpc_service)
        if app is None:
            app = self._apps[grpc_service] = service_app(
                schema,
                self._forwarder.channel,
                read_max_bytes=self._settings.limits.max_receive_message_bytes,
            )
        return app, full_method

    def _authenticate(self, scope: dict[str, Any], headers: Sequence[tuple[str, str]]) -> Identity | None:
        """The caller's identity (None when the gateway does not authenticate).

        A bearer token, else (with client authentication) the name of the certificate the
        request's connection presented, as the gRPC side's ``auth_context`` gives it.
        """
        if not self._authenticating:
            return None
        auth_context: dict[str, list[bytes]] = {}
        client = scope.get("client")
        if self._server is not None and client:
            name = self._server.common_name_of(f"{client[0]}:{client[1]}")
            if name:
                auth_context["x509_common_name"] = [name.encode()]
        try:
            return self._authenticator.authenticate(headers, auth_context)
        except AuthenticationError as exc:
            raise UnauthenticatedError(str(exc)) from exc

    def _admit(self, scope: dict[str, Any], identity: Identity | None, call: HttpCall) -> None:
        """Count the call on its connection and for its identity, as the gRPC port's guard does.

        Raises:
            ResourceExhaustedError: over ``max_calls_per_connection`` or ``max_calls_per_identity``.
        """
        client = scope.get("client")
        connection = f"http:{client[0]}:{client[1]}" if client else "http:unknown"
        reason = self._tracker.acquire_connection(connection)
        if reason is not None:
            raise ResourceExhaustedError(reason)
        if identity is not None:
            reason = self._tracker.acquire_identity(identity.name, None)
            if reason is not None:
                self._tracker.release_connection(connection)
                raise ResourceExhaustedError(reason)
        call.admitted = (connection, identity.name if identity is not None else None)

    def _release(self, call: HttpCall) -> None:
        if call.admitted is not None:
            connection, name = call.admitted
            call.admitted = None
            self._tracker.release_connection(connection)
            if name is not None:
                self._tracker.release_identity(name, None)

    async def _schema(self, service: str, grpc_service: str) -> ServiceSchema | None:
        return await self._forwarder.shapes.schema(self._forwarder.channel(service), grpc_service)

    async def _service_with(self, service: str, method_name: str) -> str:
        """The gRPC service of ``service``'s backend that has ``method_name`` (NOT_FOUND when none)."""
        channel = self._forwarder.channel(service)
        for grpc_service in await self._forwarder.shapes.services(channel, service):
            schema = await self._forwarder.shapes.schema(channel, grpc_service)
            if schema is not None and schema.method(method_name) is not None:
                return grpc_service
        raise NotFoundError(f"{service} has no method {method_name!r}")


def _grpc_path(path: str) -> str | None:
    """``path`` when it is ``/package.Service/Method``, else None."""
    parts = path.split("/")
    if len(parts) == 3 and not parts[0] and parts[1] and parts[2]:
        return path
    return None


def _correlation_header(call: HttpCall) -> tuple[bytes, bytes]:
    return (CORRELATION_METADATA_KEY.encode(), (call.correlation or "").encode("latin-1"))


def _code_of(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code()
    if isinstance(error, StatusError):
        return error.code
    return grpc.StatusCode.UNKNOWN


async def _refused(send: Send, reason: str) -> None:
    """403 ``permission_denied`` for a request that is not an RPC at all, as the control plane answers it."""
    body = json.dumps({"code": "permission_denied", "message": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _plain(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    """An HTTP answer before the Connect protocol applies (wrong HTTP method or content type)."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
