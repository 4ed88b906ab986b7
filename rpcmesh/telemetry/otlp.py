"""A cheaper OTLP/gRPC span exporter: the SDK's exporter with a caching span encoder.

The stock ``encode_spans`` builds every attribute (``KeyValue`` + ``AnyValue``), the resource
and the scope anew for each span and hashes each span's ``Resource`` through ``json.dumps``;
in the export thread of a busy process that costs several times the span's own recording. RPC
spans repeat almost everything: ``rpc.system``, ``rpc.service``, ``rpc.method``, the server
address, the status code. ``encode_spans_cached`` builds each such ``KeyValue`` once and copies
it (in C) into each span; high-cardinality values (correlation ids, peer ports, anything
unhashable) are encoded per span as before. Resource and scope are encoded once per batch
group, grouped by identity. The output is the same message ``encode_spans`` produces (a test
pins that); everything else (retries, TLS, headers, compression) is the SDK exporter's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_attributes,
    _encode_instrumentation_scope,
    _encode_key_value,
    _encode_resource,
)
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import (
    _SPAN_KIND_MAP,
    _encode_events,
    _encode_links,
    _encode_trace_state,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, SpanFlags, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.trace import ReadableSpan

from rpcmesh.telemetry.correlation import CORRELATION_ATTRIBUTE

UNCACHED_ATTRIBUTES = frozenset({CORRELATION_ATTRIBUTE, "network.peer.port", "exception.stacktrace"})
"""Attributes whose values differ per call: never cached."""

_MAX_CACHED = 8192
# The generated constructors take None for "unset" (as the SDK's encoder passes); their stubs say otherwise.
_new_span: Any = PbSpan
_new_scope_spans: Any = ScopeSpans
_HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


class _Encoder:
    """Caches of encoded attributes and statuses, shared by the batches of one exporter."""

    def __init__(self) -> None:
        self._pairs: dict[tuple[str, type, Any], KeyValue] = {}
        self._statuses: dict[tuple[int, str | None], Status] = {}

    def attributes(self, attributes: Any) -> list[KeyValue]:
        if not attributes:
            return []
        pairs = self._pairs
        encoded: list[KeyValue] = []
        for key, value in attributes.items():
            if key in UNCACHED_ATTRIBUTES or not isinstance(value, str | int | float | bool):
                encoded.extend(_encode_attributes({key: value}))
                continue
            cache_key = (key, type(value), value)
            pair = pairs.get(cache_key)
            if pair is None:
                pair = _encode_key_value(key, value)
                if len(pairs) >= _MAX_CACHED:  # a high-cardinality attribute: start over, stay bounded
                    pairs.clear()
                pairs[cache_key] = pair
            encoded.append(pair)
        return encoded

    def status(self, status: Any) -> Status | None:
        if status is None:
            return None
        key = (status.status_code.value, status.description)
        cached = self._statuses.get(key)
        if cached is None:
            cached = Status(code=key[0], message=key[1])
            if len(self._statuses) < _MAX_CACHED:
                self._statuses[key] = cached
        return cached

    def span(self, span: ReadableSpan) -> PbSpan:
        context = span.get_span_context()
        assert context is not None
        parent = span.parent
        flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)
        encoded: PbSpan = _new_span(
            trace_id=context.trace_id.to_bytes(16, "big"),
            span_id=context.span_id.to_bytes(8, "big"),
            trace_state=_encode_trace_state(context.trace_state),
            parent_span_id=parent.span_id.to_bytes(8, "big") if parent else None,
            name=span.name,
            kind=_SPAN_KIND_MAP[span.kind],
            start_time_unix_nano=span.start_time,
            end_time_unix_nano=span.end_time,
            attributes=self.attributes(span.attributes),
            events=_encode_events(span.events) if span.events else None,
            links=_encode_links(span.links) if span.links else None,
            status=self.status(span.status),
            dropped_attributes_count=span.dropped_attributes,
            dropped_events_count=span.dropped_events,
            dropped_links_count=span.dropped_links,
            flags=flags,
        )
        return encoded

    def request(self, spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        groups: dict[tuple[int, int], tuple[Any, Any, list[PbSpan]]] = {}
        for span in spans:
            scope = span.instrumentation_scope or None
            key = (id(span.resource), id(scope))
            group = groups.get(key)
            if group is None:
                group = groups[key] = (span.resource, scope, [])
            group[2].append(self.span(span))
        by_resource: dict[int, tuple[Any, list[ScopeSpans]]] = {}
        for resource, scope, encoded in groups.values():
            scope_spans = _new_scope_spans(
                scope=_encode_instrumentation_scope(scope),
                spans=encoded,
                schema_url=scope.schema_url if scope else None,
            )
            by_resource.setdefault(id(resource), (resource, []))[1].append(scope_spans)
        return ExportTraceServiceRequest(
            resource_spans=[
                ResourceSpans(
                    resource=_encode_resource(resource),
                    scope_spans=scope_spans,
                    schema_url=resource.schema_url,
                )
                for resource, scope_spans in by_resource.values()
            ]
        )


def encode_spans_cached(
    spans: Sequence[ReadableSpan], encoder: _Encoder | None = None
) -> ExportTraceServiceRequest:
    """The ``ExportTraceServiceRequest`` that ``encode_spans`` builds, built with caches."""
    return (encoder or _Encoder()).request(spans)


class CachingOtlpSpanExporter(OTLPSpanExporter):
    """``OTLPSpanExporter`` (same arguments) encoding through ``encode_spans_cached``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encoder = _Encoder()

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return self._encoder.request(data)
