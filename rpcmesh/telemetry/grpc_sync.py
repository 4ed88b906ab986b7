"""Tracing interceptors for the sync gRPC API: one client class for all four shapes, and a server interceptor.

Same behaviour as ``grpc_aio`` (spans, propagation, correlation ids, durations), for
``grpc.intercept_channel(channel, *sync_client_interceptors())`` and
``grpc.server(executor, interceptors=[SyncServerTracingInterceptor()])``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc
from opentelemetry import context as otel_context

from rpcmesh.telemetry._calls import (
    CallRecord,
    begin_client_call,
    begin_server_call,
    set_peer,
    status_code_of,
)
from rpcmesh.telemetry.correlation import reset_correlation_id, set_correlation_id
from rpcmesh.telemetry.setup import Telemetry, get_telemetry


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _ClientCallDetails(_CallDetails, grpc.ClientCallDetails):
    """grpc.ClientCallDetails with new metadata (the original is immutable)."""


class SyncClientTracingInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Client spans for every RPC shape of a sync channel."""

    def __init__(self, telemetry: Telemetry | None = None, *, target: str | None = None) -> None:
        self._telemetry = telemetry
        self._target = target

    def _intercept(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        telemetry = self._telemetry or get_telemetry()
        record, metadata = begin_client_call(telemetry, details.method, details.metadata, self._target)
        new_details = _ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )
        token = otel_context.attach(record.context) if record.context is not None else None
        correlation_token = set_correlation_id(record.correlation)
        try:
            call = continuation(new_details, request)
        except BaseException as exc:
            record.finish_with_error(exc)
            raise
        finally:
            reset_correlation_id(correlation_token)
            if token is not None:
                otel_context.detach(token)
        call.add_done_callback(lambda done: _finish(record, done))
        return call

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        """Trace one call."""
        return self._intercept(continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        """Trace one call; the span ends when the stream does."""
        return self._intercept(continuation, client_call_details, request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        """Trace one call."""
        return self._intercept(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        """Trace one call; the span ends when the stream does."""
        return self._intercept(continuation, client_call_details, request_iterator)


def _finish(record: CallRecord, call: Any) -> None:
    try:
        code = call.code()
    except Exception as exc:  # pragma: no cover - a wrapper without code()
        record.finish_with_error(exc)
        return
    code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    record.finish(code, None if code == grpc.StatusCode.OK else call.details())


def sync_client_interceptors(
    telemetry: Telemetry | None = None, *, target: str | None = None
) -> list[SyncClientTracingInterceptor]:
    """Interceptors for ``grpc.intercept_channel``; empty when the given telemetry is fully off."""
    if telemetry is not None and not telemetry.active and not telemetry.propagate_correlation:
        return []
    return [SyncClientTracingInterceptor(telemetry, target=target)]


class SyncServerTracingInterceptor(grpc.ServerInterceptor):
    """Server spans, correlation ids and call durations for a sync ``grpc.server``."""

    def __init__(self, telemetry: Telemetry | None = None) -> None:
        self._telemetry = telemetry

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wrap the method's handler."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        telemetry = self._telemetry or get_telemetry()
        if not telemetry.active and not telemetry.propagate_correlation:
            return handler
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata

        def start(context: grpc.ServicerContext) -> CallRecord:
            record = begin_server_call(telemetry, method, metadata)
            set_peer(record, context.peer())
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


def _code(context: Any) -> grpc.StatusCode:
    try:
        return status_code_of(context.code()) or grpc.StatusCode.OK
    except (AttributeError, NotImplementedError):  # pragma: no cover - very old grpcio
        return grpc.StatusCode.OK


def _abort_code(context: Any, error: BaseException) -> grpc.StatusCode | None:
    # The sync context.abort() raises a bare Exception after setting the code.
    return _code(context) if type(error) is Exception else None


def _wrap_unary(behavior: Callable[..., Any], start: Callable[[Any], CallRecord]) -> Callable[..., Any]:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        record = start(context)
        # Pool threads are reused: everything set here is reset before the thread moves on.
        token = otel_context.attach(record.context) if record.context is not None else None
        correlation_token = set_correlation_id(record.correlation)
        try:
            response = behavior(request, context)
        except BaseException as exc:
            record.finish_with_error(exc, _abort_code(context, exc))
            raise
        finally:
            reset_correlation_id(correlation_token)
            if token is not None:
                otel_context.detach(token)
        record.finish(_code(context))
        return response

    return wrapped


def _wrap_stream(behavior: Callable[..., Any], start: Callable[[Any], CallRecord]) -> Callable[..., Any]:
    if not inspect.isgeneratorfunction(behavior):
        return _wrap_unary(behavior, start)

    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        record = start(context)
        token = otel_context.attach(record.context) if record.context is not None else None
        correlation_token = set_correlation_id(record.correlation)
        try:
            yield from behavior(request, context)
        except BaseException as exc:
            record.finish_with_error(exc, _abort_code(context, exc))
            raise
        finally:
            reset_correlation_id(correlation_token)
            if token is not None:
                otel_context.detach(token)
        record.finish(_code(context))

    return wrapped
