"""The shared, shape-independent part of the tracing interceptors: start and finish one call.

Both the asyncio and the sync interceptors (client and server) are thin shells around
``begin_client_call`` / ``begin_server_call`` and ``CallRecord.finish``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from rpcmesh.errors import StatusError
from rpcmesh.telemetry.correlation import (
    CORRELATION_ATTRIBUTE,
    CORRELATION_METADATA_KEY,
    choose_correlation_id,
    correlation_id,
    new_correlation_id,
)
from rpcmesh.telemetry.propagation import (
    PROPAGATED_KEYS,
    carrier_from_metadata,
    context_with_correlation,
    extract_carrier,
    inject_carrier,
)
from rpcmesh.telemetry.setup import Telemetry

# Server spans are errors only for codes that mean the server failed (semconv for gRPC servers).
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def split_method(full_method: str | bytes) -> tuple[str, str]:
    """``/echo.v1.Echo/Echo`` → (``echo.v1.Echo``, ``Echo``); anything else → (``unknown``, the name)."""
    if isinstance(full_method, bytes):  # grpc.aio hands bytes to client interceptors (grpc#31092)
        full_method = full_method.decode()
    service, sep, method = full_method.lstrip("/").rpartition("/")
    if not sep or not service or not method:
        return "unknown", full_method
    return service, method


def split_address(address: str | None) -> tuple[str | None, int | None]:
    """A peer or target (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, ``host:5``, ``dns:///h:5``) → (host, port)."""
    if not address:
        return None, None
    for prefix in ("ipv4:", "ipv6:", "dns:///", "dns:"):
        if address.startswith(prefix):
            address = address[len(prefix) :]
            break
    if address.startswith("unix:"):
        return address, None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address, None
    return host.strip("[]") or None, int(port)


def status_code_of(value: Any) -> grpc.StatusCode | None:
    """A ``grpc.StatusCode`` from what ``ServicerContext.code()`` gives (enum, int or None)."""
    if value is None or isinstance(value, grpc.StatusCode):
        return value
    if isinstance(value, int):
        return _CODE_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)
    return None


class CallRecord:
    """One RPC in flight: its span (when tracing), start time and labels."""

    __slots__ = (
        "_finished",
        "context",
        "correlation",
        "kind",
        "method",
        "service",
        "span",
        "start",
        "telemetry",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        kind: SpanKind,
        service: str,
        method: str,
        correlation: str,
        span: Span | None,
        context: Context | None,
    ) -> None:
        self.telemetry = telemetry
        self.kind = kind
        self.service = service
        self.method = method
        self.correlation = correlation
        self.span = span
        self.context = context
        self.start = time.perf_counter()
        self._finished = False

    def finish(
        self, code: grpc.StatusCode, description: str | None = None, error: BaseException | None = None
    ) -> None:
        """End the span with the status and record the duration; later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        duration = time.perf_counter() - self.start
        span = self.span
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            is_error = (
                code in _SERVER_ERROR_CODES if self.kind is SpanKind.SERVER else code != grpc.StatusCode.OK
            )
            if is_error:
                if error is not None and not isinstance(error, StatusError | grpc.RpcError):
                    span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {description or ''}".rstrip(": ")))
            span.end()
        metrics = self.telemetry.metrics
        if metrics.enabled:
            if self.kind is SpanKind.SERVER:
                metrics.server_call(self.service, self.method, code, duration)
            else:
                metrics.client_call(self.service, self.method, code, duration)

    def finish_with_error(self, error: BaseException, code: grpc.StatusCode | None = None) -> None:
        """End the call from an exception (RpcError, rpcmesh StatusError, cancellation, anything)."""
        description: str | None = str(error) or None
        if code is None:
            if isinstance(error, StatusError):
                code, description = error.code, error.message
            elif isinstance(error, grpc.RpcError) and hasattr(error, "code"):
                code = error.code()
                description = error.details() if hasattr(error, "details") else description
            elif _is_cancellation(error):
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.UNKNOWN
        self.finish(code, description, error)


def _is_cancellation(error: BaseException) -> bool:
    import asyncio

    return isinstance(error, asyncio.CancelledError | GeneratorExit)


def begin_client_call(
    telemetry: Telemetry,
    full_method: str | bytes,
    metadata: Iterable[tuple[str, Any]] | None,
    target: str | None,
) -> tuple[CallRecord, list[tuple[str, Any]]]:
    """Start a client call: its span (child of the current one) and the metadata to send."""
    service, method = split_method(full_method)
    correlation = correlation_id() or new_correlation_id()
    carrier: dict[str, str] = {}
    span: Span | None = None
    context: Context | None = None
    if telemetry.tracing:
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            CORRELATION_ATTRIBUTE: correlation,
        }
        host, port = split_address(target)
        if host is not None:
            attributes["server.address"] = host
        if port is not None:
            attributes["server.port"] = port
        span = telemetry.tracer.start_span(f"{service}/{method}", kind=SpanKind.CLIENT, attributes=attributes)
        context = context_with_correlation(correlation, trace.set_span_in_context(span))
        inject_carrier(carrier, None, context)
        carrier[CORRELATION_METADATA_KEY] = correlation
    else:
        carrier[CORRELATION_METADATA_KEY] = correlation
    outgoing = [(k, v) for k, v in (metadata or ()) if k not in PROPAGATED_KEYS]
    outgoing.extend(carrier.items())
    record = CallRecord(telemetry, SpanKind.CLIENT, service, method, correlation, span, context)
    return record, outgoing


def begin_server_call(
    telemetry: Telemetry, full_method: str, invocation_metadata: Iterable[Any] | None
) -> CallRecord:
    """Start a server call: continue the caller's trace and adopt (or create) its correlation id."""
    service, method = split_method(full_method)
    carrier = carrier_from_metadata(invocation_metadata)
    span: Span | None = None
    context: Context | None = None
    if telemetry.tracing:
        remote, correlation = extract_carrier(carrier)
        span = telemetry.tracer.start_span(
            f"{service}/{method}",
            context=remote,
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": method,
                CORRELATION_ATTRIBUTE: correlation,
            },
        )
        context = trace.set_span_in_context(span, remote)
    elif "baggage" in carrier and CORRELATION_METADATA_KEY not in carrier:
        _, correlation = extract_carrier(carrier)
    else:
        correlation = choose_correlation_id(carrier.get(CORRELATION_METADATA_KEY))
    return CallRecord(telemetry, SpanKind.SERVER, service, method, correlation, span, context)


def set_peer(record: CallRecord, peer: str | None) -> None:
    """Add the caller's address to a server span."""
    if record.span is None:
        return
    host, port = split_address(peer)
    if host is not None:
        record.span.set_attribute("network.peer.address", host)
    if port is not None:
        record.span.set_attribute("network.peer.port", port)
