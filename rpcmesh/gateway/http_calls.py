"""Connect endpoints built at runtime from a service's reflection descriptors, forwarding through the mesh.

:func:`service_app` builds a ``connectrpc`` ASGI application for one gRPC service: its
endpoints (one per method, built on first use from the :class:`~rpcmesh.gateway.shapes.ServiceSchema`)
decode the Connect request (JSON or binary, checked against the method's input message: unknown JSON
fields and bodies that are not JSON are INVALID_ARGUMENT), forward it as protobuf bytes through the
mesh channel of the registered service the router resolved (discovery, balancing, retries, breakers,
deadlines) and encode the backend's answer. A backend's failure becomes the Connect error with the
same code, message and ``google.rpc`` details (the ``grpc-status-details-bin`` Anys, untouched).

:class:`ErrorApp` answers errors decided before any endpoint exists (unknown path, refused origin,
authentication, authorization) through ``connectrpc`` too, so even they are written by the library
in the protocol the caller speaks (a unary error body, or a stream's end message).

The router (:mod:`rpcmesh.gateway.http_ingress`) puts the call's state (:class:`HttpCall`) in a
context variable before handing the request to an app; the endpoints read it.
"""

from __future__ import annotations

import base64
import contextvars
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from google.protobuf import any_pb2, descriptor, empty_pb2
from google.rpc import status_pb2
from protobuf.wkt import Any as WireAny

from rpcmesh.errors import StatusError, invalid_argument
from rpcmesh.gateway.shapes import ServiceSchema
from rpcmesh.telemetry.correlation import CORRELATION_METADATA_KEY

__all__ = [
    "ErrorApp",
    "HttpCall",
    "connect_error",
    "forwardable_headers",
    "service_app",
]

_DETAILS_KEY = "grpc-status-details-bin"
# Request headers that belong to HTTP or the Connect protocol, never forwarded as gRPC metadata.
_HTTP_ONLY = frozenset(
    {
        "accept",
        "accept-encoding",
        "accept-language",
        "authorization",
        "cache-control",
        "connection",
        "content-encoding",
        "content-length",
        "content-type",
        "cookie",
        "host",
        "keep-alive",
        "origin",
        "pragma",
        "priority",
        "proxy-authorization",
        "referer",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
        "user-agent",
        "x-user-agent",
        "x-grpc-web",
    }
)
_HTTP_ONLY_PREFIXES = (":", "grpc-", "connect-", "sec-")
_METADATA_KEY = re.compile(r"^[0-9a-z_.-]+$")
# gRPC status codes by name, for the Connect codes (which spell CANCELLED "canceled").
_CONNECT_CODES = {code.name: code for code in Code}
_CONNECT_CODES["CANCELLED"] = Code.CANCELED

_STREAM_TYPES = {
    (False, False): StreamType.UNARY,
    (True, False): StreamType.CLIENT_STREAM,
    (False, True): StreamType.SERVER_STREAM,
    (True, True): StreamType.BIDI_STREAM,
}


@dataclass
class HttpCall:
    """One HTTP call's state, set by the router for the endpoint that serves it."""

    service: str = ""
    """The registered service it goes to."""

    metadata: tuple[tuple[str, str | bytes], ...] = ()
    """The caller's headers to forward as gRPC metadata."""

    correlation: str | None = None
    """The call's correlation id (sent back as ``x-correlation-id``)."""

    error: ConnectError | None = None
    """What :class:`ErrorApp` answers."""

    code: grpc.StatusCode | None = None
    """The call's outcome as an endpoint saw it (None: no endpoint ran)."""

    admitted: tuple[str, str | None] | None = None
    """(connection, identity name) the call is counted on in the concurrency limits, once admitted."""


current_call: contextvars.ContextVar[HttpCall] = contextvars.ContextVar("rpcmesh_gateway_http_call")


def connect_error(error: BaseException) -> ConnectError:
    """The Connect error for a failed call: the same code, message and ``google.rpc`` details.

    Args:
        error: A backend's ``grpc.aio.AioRpcError`` (the mesh channel's ``RpcStatusError`` is one),
            or an rpcmesh :class:`~rpcmesh.errors.StatusError` raised here (authorization, routing).
    """
    anys: Sequence[any_pb2.Any] = ()
    if isinstance(error, grpc.aio.AioRpcError):
        code, message = error.code(), error.details() or ""
        for key, value in error.trailing_metadata() or ():
            if key == _DETAILS_KEY and isinstance(value, bytes):
                anys = status_pb2.Status.FromString(value).details
    elif isinstance(error, StatusError):
        code, message = error.code, error.message
    else:
        return ConnectError(Code.UNKNOWN, str(error))
    if not anys and isinstance(error, StatusError) and error.details:
        packed = []
        for item in error.details:
            wrapped = any_pb2.Any()
            wrapped.Pack(item)
            packed.append(wrapped)
        anys = packed
    details = [ErrorDetail(WireAny(type_url=item.type_url, value=item.value)) for item in anys]
    return ConnectError(_CONNECT_CODES.get(code.name, Code.UNKNOWN), message, details)


def forwardable_headers(headers: Sequence[tuple[str, str]]) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's HTTP headers that travel on as gRPC metadata (custom ones; not HTTP's or Connect's).

    ``-bin`` headers carry base64 (the Connect protocol's rule) and are decoded; the caller's
    ``authorization`` stays at the gateway, as on its gRPC side.

    Raises:
        InvalidArgumentError: a ``-bin`` header that is not base64.
    """
    forwarded: list[tuple[str, str | bytes]] = []
    for key, value in headers:
        if key in _HTTP_ONLY or key.startswith(_HTTP_ONLY_PREFIXES) or not _METADATA_KEY.match(key):
            continue
        if key.endswith("-bin"):
            try:
                forwarded.append((key, base64.b64decode(value + "=" * (-len(value) % 4), validate=True)))
            except ValueError as exc:
                raise invalid_argument(key, "a -bin header must be base64") from exc
        else:
            forwarded.append((key, value))
    return tuple(forwarded)


def _timeout(ctx: RequestContext[Any, Any]) -> float | None:
    """The caller's deadline (``connect-timeout-ms``) as seconds left, or None."""
    left = ctx.timeout_ms
    return None if left is None else max(left / 1000.0, 0.001)


def _answer(ctx: RequestContext[Any, Any], trailers: Any) -> None:
    """Send back the backend's trailing metadata (``-bin`` values as base64).

    The router adds the correlation id header to every answer itself.
    """
    for key, value in trailers or ():
        if key.startswith("grpc-") or key == CORRELATION_METADATA_KEY:
            continue
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode().rstrip("=")
        ctx.response_trailers.add(key, value)


def _failed(call: HttpCall, ctx: RequestContext[Any, Any], error: BaseException) -> ConnectError:
    converted = connect_error(error)
    call.code = _grpc_code(converted.code)
    return converted


def _grpc_code(code: Code) -> grpc.StatusCode:
    if code is Code.CANCELED:
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode[code.name]


class _Forwarding:
    """The four endpoint shapes of one method, forwarding through the mesh channel of the call's service."""

    def __init__(self, channel_for: Callable[[str], Any], full_method: str, output: type[Any]) -> None:
        self._channel_for = channel_for
        self._method = full_method
        self._output = output

    async def unary(self, request: Any, ctx: RequestContext[Any, Any]) -> Any:
        call = current_call.get()
        channel = self._channel_for(call.service)
        try:
            pending = channel.unary_unary(self._method)(
                request.SerializeToString(), timeout=_timeout(ctx), metadata=call.metadata
            )
            raw = await pending
            trailers = await pending.trailing_metadata()
        except (grpc.aio.AioRpcError, StatusError) as error:
            raise _failed(call, ctx, error) from error
        call.code = grpc.StatusCode.OK
        _answer(ctx, trailers)
        return self._output.FromString(raw)

    async def client_stream(self, requests: AsyncIterator[Any], ctx: RequestContext[Any, Any]) -> Any:
        call = current_call.get()
        channel = self._channel_for(call.service)
        try:
            pending = channel.stream_unary(self._method)(
                _serialized(requests), timeout=_timeout(ctx), metadata=call.metadata
            )
            raw = await pending
            trailers = await pending.trailing_metadata()
        except (grpc.aio.AioRpcError, StatusError) as error:
            raise _failed(call, ctx, error) from error
        call.code = grpc.StatusCode.OK
        _answer(ctx, trailers)
        return self._output.FromString(raw)

    async def server_stream(self, request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        call = current_call.get()
        channel = self._channel_for(call.service)
        stream = channel.unary_stream(self._method)(
            request.SerializeToString(), timeout=_timeout(ctx), metadata=call.metadata
        )
        async for message in self._relay(stream, call, ctx):
            yield message

    async def bidi_stream(
        self, requests: AsyncIterator[Any], ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[Any]:
        call = current_call.get()
        channel = self._channel_for(call.service)
        stream = channel.stream_stream(self._method)(
            _serialized(requests), timeout=_timeout(ctx), metadata=call.metadata
        )
        async for message in self._relay(stream, call, ctx):
            yield message

    async def _relay(self, stream: Any, call: HttpCall, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        """The backend's responses, decoded; its status at the end becomes the stream's."""
        finished = False
        try:
            async for raw in stream:
                yield self._output.FromString(raw)
            trailers = await stream.trailing_metadata()
            finished = True
        except (grpc.aio.AioRpcError, StatusError) as error:
            finished = True
            raise _failed(call, ctx, error) from error
        finally:
            if not finished:  # the HTTP caller went away: stop the backend call too
                stream.cancel()
        call.code = grpc.StatusCode.OK
        _answer(ctx, trailers)


async def _serialized(requests: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request.SerializeToString()


class _LazyEndpoints(Mapping[str, Any]):
    """``/package.Service/Method`` -> Endpoint, each built the first time it is asked for."""

    def __init__(self, schema: ServiceSchema, channel_for: Callable[[str], Any]) -> None:
        self._schema = schema
        self._channel_for = channel_for
        self._prefix = f"/{schema.service.full_name}/"
        self._built: dict[str, Any] = {}

    def __getitem__(self, path: str) -> Any:
        built = self._built.get(path)
        if built is None:
            method = (
                self._schema.method(path.removeprefix(self._prefix))
                if path.startswith(self._prefix)
                else None
            )
            if method is None:
                raise KeyError(path)
            built = self._built[path] = self._endpoint(method)
        return built

    def __iter__(self) -> Iterator[str]:
        return iter(f"{self._prefix}{method.name}" for method in self._schema.service.methods)

    def __len__(self) -> int:
        return len(self._schema.service.methods)

    def _endpoint(self, method: descriptor.MethodDescriptor) -> Any:
        output = ServiceSchema.message_class(method.output_type)
        stream_type = _STREAM_TYPES[(method.client_streaming, method.server_streaming)]
        info: MethodInfo[Any, Any] = MethodInfo(
            name=method.name,
            service_name=self._schema.service.full_name,
            input=ServiceSchema.message_class(method.input_type),
            output=output,
            idempotency_level=IdempotencyLevel.UNKNOWN,
            stream_type=stream_type,
        )
        forwarding = _Forwarding(self._channel_for, f"{self._prefix}{method.name}", output)
        if stream_type is StreamType.UNARY:
            return Endpoint.unary(info, forwarding.unary)
        if stream_type is StreamType.CLIENT_STREAM:
            return Endpoint.client_stream(info, forwarding.client_stream)
        if stream_type is StreamType.SERVER_STREAM:
            return Endpoint.server_stream(info, forwarding.server_stream)
        return Endpoint.bidi_stream(info, forwarding.bidi_stream)


class _App(ConnectASGIApplication[None]):
    """A Connect ASGI application whose endpoints are given (no generated service class)."""

    def __init__(self, path: str, endpoints: Mapping[str, Any], **options: Any) -> None:
        self._path = path
        super().__init__(service=None, endpoints=lambda _: endpoints, **options)

    @property
    def path(self) -> str:
        """The service's path prefix (``/package.Service``)."""
        return self._path


def service_app(
    schema: ServiceSchema, channel_for: Callable[[str], Any], *, read_max_bytes: int
) -> ConnectASGIApplication[None]:
    """The Connect application of one gRPC service: JSON (strict: unknown fields refused) and binary.

    Args:
        schema: The service's descriptors.
        channel_for: Registered service name -> its mesh channel.
        read_max_bytes: The largest request message (larger: RESOURCE_EXHAUSTED).
    """
    return _App(
        f"/{schema.service.full_name}",
        _LazyEndpoints(schema, channel_for),
        codecs=[google_protobuf_binary_codec(), google_protobuf_json_codec(ignore_unknown_fields=False)],
        read_max_bytes=read_max_bytes,
    )


class _IgnoringCodec:
    """Decodes any body as an empty message: the error app answers before looking at it."""

    def __init__(self, name: str) -> None:
        self._name = name

    def name(self) -> str:
        return self._name

    def encode(self, message: Any) -> bytes:
        return bytes(message.SerializeToString())

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        return message_class()


class ErrorApp:
    """Answers :attr:`HttpCall.error` in the request's protocol (Connect unary or streaming, gRPC-Web)."""

    PATH = "/rpcmesh.gateway.Refused/Call"

    def __init__(self) -> None:
        unary: MethodInfo[Any, Any] = MethodInfo(
            name="Call",
            service_name="rpcmesh.gateway.Refused",
            input=empty_pb2.Empty,
            output=empty_pb2.Empty,
            idempotency_level=IdempotencyLevel.UNKNOWN,
            stream_type=StreamType.UNARY,
        )
        streaming: MethodInfo[Any, Any] = MethodInfo(
            name="Call",
            service_name="rpcmesh.gateway.Refused",
            input=empty_pb2.Empty,
            output=empty_pb2.Empty,
            idempotency_level=IdempotencyLevel.UNKNOWN,
            stream_type=StreamType.SERVER_STREAM,
        )
        codecs = [_IgnoringCodec("proto"), _IgnoringCodec("json")]
        self.unary = _App(
            "/rpcmesh.gateway.Refused", {self.PATH: Endpoint.unary(unary, self._refuse)}, codecs=codecs
        )
        self.streaming = _App(
            "/rpcmesh.gateway.Refused",
            {self.PATH: Endpoint.server_stream(streaming, self._refuse_stream)},
            codecs=codecs,
        )

    @staticmethod
    async def _refuse(request: Any, ctx: RequestContext[Any, Any]) -> Any:
        call = current_call.get()
        raise call.error or ConnectError(Code.INTERNAL, "no error to answer")

    @classmethod
    async def _refuse_stream(cls, request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        await cls._refuse(request, ctx)
        yield request  # pragma: no cover - _refuse always raises
