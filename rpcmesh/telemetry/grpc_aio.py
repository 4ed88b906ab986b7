"""Tracing interceptors for ``grpc.aio``: one client class per RPC shape, and one server interceptor.

Client: each call gets a CLIENT span (``rpc.*`` attributes, ``server.address``), W3C
``traceparent``/``baggage`` and ``x-correlation-id`` in its metadata, and a duration
sample. While the call is set up the span is current, so interceptors listed after these
(the retry/hedge/breaker layers) record attempts on it with ``record_attempt`` and
``record_breaker_rejection``. List these first: the first interceptor is the outermost.

Server: ``AioServerTracingInterceptor`` continues the caller's trace (SERVER span),
adopts or creates the correlation id (``correlation_id()`` in the handler), and records
the duration and status. List it before ``StatusErrorInterceptor`` so it sees the
rpcmesh ``StatusError`` a handler raised, with its precise code.

This follows opentelemetry-instrumentation-grpc's ``_aio_client.py`` design, and fills its
gaps: correlation ids, metrics, rpcmesh StatusError codes, span ends for streaming
responses without replacing the call object (so ``call.read()``/``code()`` keep working),
and a telemetry handle instead of process globals.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from opentelemetry import context as otel_context

from rpcmesh.telemetry._calls import (
    CallRecord,
    begin_client_call,
    begin_server_call,
    method_info,
    set_peer,
    status_code_of,
)
from rpcmesh.telemetry.correlation import reset_correlation_id, set_correlation_id
from rpcmesh.telemetry.setup import Telemetry, get_telemetry

Continuation = Callable[..., Awaitable[Any]]

# Tasks that read the final status of finished streaming calls; kept so they are not collected mid-run.
_finishers: set[asyncio.Task[None]] = set()


class _AioClientBase:
    """Shared state of the four client shapes."""

    def __init__(self, telemetry: Telemetry | None = None, *, target: str | None = None) -> None:
        self._telemetry = telemetry
        self._target = target

    def _begin(self, details: grpc.aio.ClientCallDetails) -> tuple[CallRecord, grpc.aio.ClientCallDetails]:
        telemetry = self._telemetry or get_telemetry()
        record, metadata = begin_client_call(telemetry, details.method, details.metadata, self._target)
        new_details = grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*metadata),
            details.credentials,
            details.wait_for_ready,
        )
        return record, new_details

    async def _unary_response(self, record: CallRecord, invoke: Callable[[], Awaitable[Any]]) -> Any:
        token = otel_context.attach(record.context) if record.context is not None else None
        correlation_token = set_correlation_id(record.correlation)
        try:
            call = await invoke()
            # Waits for the end of the call (not for the caller's await of it): the span covers it all.
            code = await call.code()
        except BaseException as exc:
            record.finish_with_error(exc)
            raise
        finally:
            reset_correlation_id(correlation_token)
            if token is not None:
                otel_context.detach(token)
        record.finish(code, None if code == grpc.StatusCode.OK else await call.details())
        return call

    async def _stream_response(self, record: CallRecord, invoke: Callable[[], Awaitable[Any]]) -> Any:
        token = otel_context.attach(record.context) if record.context is not None else None
        correlation_token = set_correlation_id(record.correlation)
        try:
            call = await invoke()
        except BaseException as exc:
            record.finish_with_error(exc)
            raise
        finally:
            reset_correlation_id(correlation_token)
            if token is not None:
                otel_context.detach(token)
        try:
            call.add_done_callback(lambda done: _finish_later(record, done))
        except NotImplementedError:  # a wrapper that cannot notify: the span ends now
            record.finish(grpc.StatusCode.OK)
        return call


def _finish_later(record: CallRecord, call: Any) -> None:
    """Done callback: read the status (already there; the API is async) in a short task."""

    async def finish() -> None:
        try:
            code = await call.code()
            record.finish(code, None if code == grpc.StatusCode.OK else await call.details())
        except BaseException as exc:
            record.finish_with_error(exc)

    try:
        task = asyncio.get_running_loop().create_task(finish())
    except RuntimeError:  # loop gone: nothing can be read any more
        record.finish(grpc.StatusCode.CANCELLED, "event loop closed")
        return
    _finishers.add(task)
    task.add_done_callback(_finishers.discard)


class UnaryUnaryTracingInterceptor(_AioClientBase, grpc.aio.UnaryUnaryClientInterceptor):
    """Client spans for unary-unary calls."""

    async def intercept_unary_unary(
        self, continuation: Continuation, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        """Trace one call."""
        record, details = self._begin(client_call_details)
        return await self._unary_response(record, lambda: continuation(details, request))


class StreamUnaryTracingInterceptor(_AioClientBase, grpc.aio.StreamUnaryClientInterceptor):
    """Client spans for stream-unary calls."""

    async def intercept_stream_unary(
        self,
        continuation: Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        """Trace one call."""
        record, details = self._begin(client_call_details)
        return await self._unary_response(record, lambda: continuation(details, request_iterator))


class UnaryStreamTracingInterceptor(_AioClientBase, grpc.aio.UnaryStreamClientInterceptor):
    """Client spans for unary-stream calls; the span ends when the stream does."""

    async def intercept_unary_stream(
        self, continuation: Continuation, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        """Trace one call."""
        record, details = self._begin(client_call_details)
        return await self._stream_response(record, lambda: continuation(details, request))


class StreamStreamTracingInterceptor(_AioClientBase, grpc.aio.StreamStreamClientInterceptor):
    """Client spans for stream-stream calls; the span ends when the stream does."""

    async def intercept_stream_stream(
        self,
        continuation: Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        """Trace one call."""
        record, details = self._begin(client_call_details)
        return await self._stream_response(record, lambda: continuation(details, request_iterator))


def aio_client_interceptors(
    telemetry: Telemetry | None = None, *, target: str | None = None
) -> list[grpc.aio.ClientInterceptor]:
    """The four client interceptors, for ``grpc.aio.insecure_channel(..., interceptors=...)``.

    Args:
        telemetry: The handle to record into; None: ``get_telemetry()`` at each call.
        target: The channel's target (``host:port``), recorded as ``server.address``/``server.port``.

    Returns:
        An empty list when the given telemetry is off and ``propagate_correlation_when_off`` is
        False (zero cost); else one interceptor per RPC shape.
    """
    if telemetry is not None and not telemetry.active and not telemetry.propagate_correlation:
        return []
    return [
        UnaryUnaryTracingInterceptor(telemetry, target=target),
        UnaryStreamTracingInterceptor(telemetry, target=target),
        StreamUnaryTracingInterceptor(telemetry, target=target),
        StreamStreamTracingInterceptor(telemetry, target=target),
    ]


class AioServerTracingInterceptor(grpc.aio.ServerInterceptor):
    """Server spans, correlation ids and call durations for every RPC shape of a ``grpc.aio`` server.

    The wrapped handler of each method is built once and reused (keyed by the handler object
    the server found), so a call costs the span work only; handlers that an earlier
    interceptor rebuilds per call are wrapped per call.
    """

    _MAX_CACHED = 1024

    def __init__(self, telemetry: Telemetry | None = None) -> None:
        self._telemetry = telemetry
        self._wrapped: dict[int, tuple[Any, Telemetry, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wrap the method's handler."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        telemetry = self._telemetry or get_telemetry()
        if not telemetry.active and not telemetry.propagate_correlation:
            return handler
        cached = self._wrapped.get(id(handler))
        if cached is not None and cached[0] is handler and cached[1] is telemetry:
            return cached[2]
        wrapped = wrap_server_handler(handler, handler_call_details.method, telemetry)
        if len(self._wrapped) < self._MAX_CACHED:
            self._wrapped[id(handler)] = (handler, telemetry, wrapped)
        return wrapped


def wrap_server_handler(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, telemetry: Telemetry | None
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with a SERVER span, the caller's correlation id and a duration sample per call.

    Args:
        handler: The method's handler (any shape).
        method: The full method name (``/echo.v1.Echo/Echo``).
        telemetry: The handle; None: ``get_telemetry()`` at each call (fully off: the call passes through).
    """
    info = method_info(method)

    def start(context: grpc.aio.ServicerContext[Any, Any]) -> CallRecord | None:
        current = telemetry or get_telemetry()
        if not current.propagate_correlation:
            return None
        record = begin_server_call(current, info, context.invocation_metadata())
        if record.span is not None:
            set_peer(record, context.peer())
        # Each grpc.aio RPC runs in its own task (a copy of the context): nothing to reset afterwards.
        if record.context is not None:
            otel_context.attach(record.context)
        set_correlation_id(record.correlation)
        return record

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary, start),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary(handler.stream_unary, start),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream, start),
            handler.request_deserializer,
            handler.response_serializer,
        )
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(
        _wrap_stream(handler.stream_stream, start),
        handler.request_deserializer,
        handler.response_serializer,
    )


Start = Callable[[Any], CallRecord | None]


def _final_code(context: Any) -> grpc.StatusCode:
    try:
        return status_code_of(context.code()) or grpc.StatusCode.OK
    except (AttributeError, NotImplementedError):  # pragma: no cover - very old grpcio
        return grpc.StatusCode.OK


def _error_code(context: Any, error: BaseException) -> grpc.StatusCode | None:
    """The code an abort set on the context (AbortError carries none of its own)."""
    if isinstance(error, grpc.aio.AbortError) or type(error) is Exception:
        return _final_code(context)
    return None


def _wrap_unary(behavior: Callable[..., Any], start: Start) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        record = start(context)
        if record is None:
            return await behavior(request, context)
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            record.finish_with_error(exc, _error_code(context, exc))
            raise
        record.finish(_final_code(context))
        return response

    return wrapped


def _wrap_stream(behavior: Callable[..., Any], start: Start) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        # A streaming handler that writes with context.write() and returns.
        return _wrap_unary(behavior, start)

    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        record = start(context)
        if record is None:
            async for response in behavior(request, context):
                yield response
            return
        try:
            async for response in behavior(request, context):
                yield response
        except BaseException as exc:
            record.finish_with_error(exc, _error_code(context, exc))
            raise
        record.finish(_final_code(context))

    return wrapped
