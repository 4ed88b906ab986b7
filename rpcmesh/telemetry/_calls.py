"""The shared, shape-independent part of the tracing interceptors: start and finish one call.

Both the asyncio and the sync interceptors (client and server) are thin shells around
``begin_client_call`` / ``begin_server_call`` and ``CallRecord.finish``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import grpc
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from rpcmesh.errors import RpcStatusError, StatusError
from rpcmesh.telemetry.correlation import (
    CORRELATION_ATTRIBUTE,
    CORRELATION_BAGGAGE_KEY,
    CORRELATION_METADATA_KEY,
    choose_correlation_id,
    correlation_id,
    new_correlation_id,
)
from rpcmesh.telemetry.propagation import (
    BAGGAGE_PROPAGATOR,
    PROPAGATED_KEYS,
    context_with_correlation,
    extract_carrier,
    inject_carrier,
)
from rpcmesh.telemetry.setup import Telemetry
from rpcmesh.telemetry.traceparent import (
    correlation_baggage,
    format_traceparent,
    own_baggage_only,
    parse_traceparent,
)

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
_TRACE_KEYS = frozenset({"traceparent", "tracestate", "baggage"})
_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
# Per code: (numeric value, error on a client span, error on a server span).
_CODE_FACTS = {
    code: (code.value[0], code is not grpc.StatusCode.OK, code in _SERVER_ERROR_CODES)
    for code in grpc.StatusCode
}


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
            value, client_error, server_error = _CODE_FACTS[code]
            span.set_attribute("rpc.grpc.status_code", value)
            if server_error if self.kind is SpanKind.SERVER else client_error:
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
            if isinstance(error, RpcStatusError):  # a mesh call's error: its real grpc.StatusCode
                code, description = grpc.aio.AioRpcError.code(error), error.message
            elif isinstance(error, StatusError):
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


class MethodInfo:
    """What every call of one method shares: names, the span name and the pre-built span attributes."""

    __slots__ = ("base", "method", "name", "service")

    def __init__(self, full_method: str | bytes, target: str | None) -> None:
        self.service, self.method = split_method(full_method)
        self.name = f"{self.service}/{self.method}"
        base: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": self.service, "rpc.method": self.method}
        host, port = split_address(target)
        if host is not None:
            base["server.address"] = host
        if port is not None:
            base["server.port"] = port
        self.base: Mapping[str, Any] = MappingProxyType(base)


_methods: dict[tuple[str | bytes, str | None], MethodInfo] = {}
_MAX_CACHED = 4096


def method_info(full_method: str | bytes, target: str | None = None) -> MethodInfo:
    """The cached ``MethodInfo`` of a method (bounded: unknown method names cannot grow it forever)."""
    key = (full_method, target)
    info = _methods.get(key)
    if info is None:
        info = MethodInfo(full_method, target)
        if len(_methods) < _MAX_CACHED:
            _methods[key] = info
    return info


def begin_client_call(
    telemetry: Telemetry,
    full_method: str | bytes,
    metadata: Iterable[tuple[str, Any]] | None,
    target: str | None,
) -> tuple[CallRecord, list[tuple[str, Any]]]:
    """Start a client call: its span (child of the current one) and the metadata to send."""
    info = method_info(full_method, target)
    correlation = correlation_id() or new_correlation_id()
    outgoing = [(k, v) for k, v in metadata if k not in PROPAGATED_KEYS] if metadata else []
    span: Span | None = None
    context: Context | None = None
    if telemetry.tracing:
        call_tracer = telemetry.call_tracer
        current = otel_context.get_current()
        if call_tracer is not None:
            parent = trace.get_current_span(current).get_span_context()
            started = call_tracer.start(
                info.name,
                SpanKind.CLIENT,
                parent if parent.is_valid else None,
                info.base,
                {CORRELATION_ATTRIBUTE: correlation},
            )
            context = trace.set_span_in_context(started, current)
            _append_trace_headers(outgoing, started.get_span_context())
            entries = baggage.get_all(current)
            if not entries or (len(entries) == 1 and CORRELATION_BAGGAGE_KEY in entries):
                outgoing.append(("baggage", correlation_baggage(correlation)))
            else:  # other baggage entries travel too: the generic propagator encodes them
                carrier: dict[str, str] = {}
                BAGGAGE_PROPAGATOR.inject(carrier, context_with_correlation(correlation, current))
                outgoing.extend(carrier.items())
            if started.is_recording():
                span = started
        else:
            attributes = {**info.base, CORRELATION_ATTRIBUTE: correlation}
            span = telemetry.tracer.start_span(info.name, kind=SpanKind.CLIENT, attributes=attributes)
            context = context_with_correlation(correlation, trace.set_span_in_context(span))
            carrier = {}
            inject_carrier(carrier, None, context)
            outgoing.extend(carrier.items())
    else:
        _pass_trace_through(metadata, outgoing)
    outgoing.append((CORRELATION_METADATA_KEY, correlation))
    record = CallRecord(telemetry, SpanKind.CLIENT, info.service, info.method, correlation, span, context)
    return record, outgoing


def _append_trace_headers(
    outgoing: list[tuple[str, Any]], span_context: trace.SpanContext, *, with_state: bool = True
) -> None:
    """``traceparent`` for ``span_context``, and its ``tracestate`` when it has one."""
    traceparent = format_traceparent(span_context.trace_id, span_context.span_id, span_context.trace_flags)
    outgoing.append(("traceparent", traceparent))
    if with_state and span_context.trace_state:
        outgoing.append(("tracestate", span_context.trace_state.to_header()))


def _pass_trace_through(metadata: Iterable[tuple[str, Any]] | None, outgoing: list[tuple[str, Any]]) -> None:
    """Tracing off here (metrics or correlation ids on): a trace the caller is in still travels on.

    The ``traceparent``/``tracestate``/``baggage`` the call was given are kept; without them,
    those of the current context (e.g. a traced caller's context that this untraced service's
    handler continues, or another tracer's span) are sent.
    """
    given = [(k, v) for k, v in metadata if k in _TRACE_KEYS] if metadata else []
    keys = {k for k, _ in given}
    outgoing.extend(given)
    if "traceparent" not in keys:
        current = otel_context.get_current()
        span_context = trace.get_current_span(current).get_span_context()
        if span_context.is_valid:
            _append_trace_headers(outgoing, span_context, with_state="tracestate" not in keys)
        if "baggage" not in keys and baggage.get_all(current):
            carrier: dict[str, str] = {}
            BAGGAGE_PROPAGATOR.inject(carrier, current)
            outgoing.extend(carrier.items())


def begin_server_call(
    telemetry: Telemetry, method: str | MethodInfo, invocation_metadata: Iterable[Any] | None
) -> CallRecord:
    """Start a server call: continue the caller's trace and adopt (or create) its correlation id.

    Args:
        telemetry: The handle to record into.
        method: The full method name, or its ``method_info`` (handler wrappers look it up once).
        invocation_metadata: The call's metadata (pairs or ``Metadatum``).
    """
    info = method if isinstance(method, MethodInfo) else method_info(method)
    # One pass over the metadata for the four propagation keys (the last of a repeated key wins).
    traceparent = tracestate = header = sent = None
    for item in invocation_metadata or ():
        key = item[0]
        if key in PROPAGATED_KEYS and isinstance(item[1], str):
            if key == "traceparent":
                traceparent = item[1]
            elif key == "baggage":
                header = item[1]
            elif key == CORRELATION_METADATA_KEY:
                sent = item[1]
            else:
                tracestate = item[1]
    call_tracer = telemetry.call_tracer
    if call_tracer is None:
        if telemetry.tracing:  # a handle built around another tracer: the SDK path
            return _begin_sdk_server_call(telemetry, info, traceparent, tracestate, header, sent)
        if traceparent is None and header is None:
            correlation = choose_correlation_id(sent)
            return CallRecord(telemetry, SpanKind.SERVER, info.service, info.method, correlation, None, None)
    remote: Context | None = None  # set when the baggage holds more than rpcmesh's entry
    from_baggage: str | None = None
    if header is not None:
        from_baggage = own_baggage_only(header)
        if from_baggage is None:  # other entries: the generic parser keeps them all
            remote = BAGGAGE_PROPAGATOR.extract({"baggage": header})
            found = baggage.get_baggage(CORRELATION_BAGGAGE_KEY, remote)
            from_baggage = found if isinstance(found, str) else None
    correlation = choose_correlation_id(sent, from_baggage)
    parent = parse_traceparent(traceparent, tracestate) if traceparent else None
    span: Span | None = None
    if call_tracer is not None:
        started: Span = call_tracer.start(
            info.name, SpanKind.SERVER, parent, info.base, {CORRELATION_ATTRIBUTE: correlation}
        )
        if started.is_recording():
            span = started
    else:
        # A traced caller, an untraced service (metrics or correlation ids only): the caller's trace
        # context and baggage pass through the handler, so nested calls continue the caller's trace.
        started = NonRecordingSpan(parent) if parent is not None else trace.INVALID_SPAN
    # Through the public API (building the Context from the API's private keys in one step saved
    # under 1 µs per server call: removed, issue 19 §4).
    fresh = remote if remote is not None else Context()
    context = trace.set_span_in_context(started, context_with_correlation(correlation, fresh))
    return CallRecord(telemetry, SpanKind.SERVER, info.service, info.method, correlation, span, context)


def _begin_sdk_server_call(
    telemetry: Telemetry,
    info: MethodInfo,
    traceparent: str | None,
    tracestate: str | None,
    header: str | None,
    sent: str | None,
) -> CallRecord:
    """A server call on a handle without a ``CallTracer``: the SDK tracer and the generic propagators."""
    found = {"traceparent": traceparent, "tracestate": tracestate, "baggage": header}
    carrier = {key: value for key, value in found.items() if value is not None}
    if sent is not None:
        carrier[CORRELATION_METADATA_KEY] = sent
    extracted, correlation = extract_carrier(carrier)
    sdk_span = telemetry.tracer.start_span(
        info.name,
        context=extracted,
        kind=SpanKind.SERVER,
        attributes={**info.base, CORRELATION_ATTRIBUTE: correlation},
    )
    context = trace.set_span_in_context(sdk_span, extracted)
    return CallRecord(telemetry, SpanKind.SERVER, info.service, info.method, correlation, sdk_span, context)


_peers: dict[str, tuple[str | None, int | None]] = {}


def set_peer(record: CallRecord, peer: str | None) -> None:
    """Add the caller's address to a server span."""
    if record.span is None or not peer:
        return
    split = _peers.get(peer)
    if split is None:
        split = split_address(peer)
        if len(_peers) >= _MAX_CACHED:  # one entry per client connection: start over rather than grow
            _peers.clear()
        _peers[peer] = split
    host, port = split
    if host is not None:
        record.span.set_attribute("network.peer.address", host)
    if port is not None:
        record.span.set_attribute("network.peer.port", port)


def start_call_span(
    telemetry: Telemetry,
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, AttributeValue] | None = None,
    shared_attributes: Mapping[str, AttributeValue] | None = None,
    context: Context | None = None,
) -> trace.Span:
    """A span, child of the current one, through the cheap ``CallTracer`` path when the handle has one.

    For spans made on every call (e.g. a mesh call's span around its attempts): much cheaper
    than ``telemetry.tracer.start_span``. End it with ``span.end()``; make it current with
    ``trace.set_span_in_context``.

    Args:
        telemetry: A ``Telemetry`` handle (tracing off: a non-recording span).
        name: Span name.
        kind: Span kind.
        attributes: This span's own attributes (copied).
        shared_attributes: Attributes shared by many spans (e.g. per method), never modified;
            pass the same mapping each time to avoid copying it per span.
        context: The parent context; None: the current one.
    """
    call_tracer = telemetry.call_tracer
    if call_tracer is None:
        merged = {**(shared_attributes or {}), **(attributes or {})}
        span: trace.Span = telemetry.tracer.start_span(name, context=context, kind=kind, attributes=merged)
        return span
    parent = trace.get_current_span(context).get_span_context()
    return call_tracer.start(
        name, kind, parent if parent.is_valid else None, shared_attributes or {}, dict(attributes or {})
    )
