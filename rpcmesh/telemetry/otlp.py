"""A cheaper OTLP/gRPC span exporter: the SDK's exporter with a caching, bytes-level span encoder.

The stock ``encode_spans`` builds a protobuf object tree per span (every attribute a
``KeyValue`` + ``AnyValue``, the resource and scope anew, each span's ``Resource`` hashed
through ``json.dumps``) and then serializes it; in the export thread of a busy process that
costs several times the span's own recording. RPC spans repeat almost everything
(``rpc.system``, ``rpc.service``, ``rpc.method``, the server address, the status code), so
``encode_spans_bytes`` writes the ``ExportTraceServiceRequest`` wire format directly: each
repeated attribute is serialized once and its bytes reused (span events' attributes too);
high-cardinality values (correlation ids, anything unhashable) are written per span, links go
through the SDK's own encoder. Resource and scope are serialized once per group. The bytes parse
to the same message ``encode_spans`` builds (a test pins that).

``CachingOtlpSpanExporter`` is ``OTLPSpanExporter`` (same arguments, retries, TLS, headers,
compression) whose stub sends those bytes as they are, a large batch as several requests of at
most ``MAX_REQUEST_BYTES``. Both rely on private names of the SDK (its ``_internal`` encoders, the
exporter's ``_initialize_channel_and_stub``/``_channel``/``_client``/``_export``/``_translate_data``),
probed at import (``private_api`` fast path ``otlp_exporter``): when they are gone ``span_exporter``
returns the stock ``OTLPSpanExporter``, and an exporter whose stub swap did not take effect
exports the stock way.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags, Status
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from rpcmesh.telemetry import private_api
from rpcmesh.telemetry.correlation import CORRELATION_ATTRIBUTE
from rpcmesh.telemetry.spans import CallSpan

# Private names (``private_api`` fast path ``otlp_exporter``): the SDK's own OTLP encoders, for
# what this module does not write by hand, and the exporter internals the bytes stub replaces.
_EXPORTER_NAMES = ("_initialize_channel_and_stub", "_export", "_translate_data")
_EXPORT_READS = ("_client", "Export", "_translate_data")  # what OTLPExporterMixin._export must go through
try:
    from opentelemetry.exporter.otlp.proto.common._internal import (
        _encode_attributes,
        _encode_instrumentation_scope,
        _encode_resource,
    )
    from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import (
        _SPAN_KIND_MAP,
        _encode_links,
        _encode_trace_state,
    )

    _missing = [name for name in _EXPORTER_NAMES if not callable(getattr(OTLPSpanExporter, name, None))]
    _export_code = getattr(getattr(OTLPSpanExporter, "_export", None), "__code__", None)
    _reads = set(_export_code.co_names) if _export_code is not None else set()
    _missing += [name for name in _EXPORT_READS if name not in _reads]
    private_api.register(
        "otlp_exporter", not _missing, f"OTLPSpanExporter lacks or no longer uses {_missing}"
    )
except ImportError as _error:  # the SDK moved its encoders: the stock exporter, and no SpanEncoder
    private_api.probe_failed("otlp_exporter", _error)
    _SPAN_KIND_MAP = {}

UNCACHED_ATTRIBUTES = frozenset({CORRELATION_ATTRIBUTE, "exception.stacktrace"})
"""Attributes whose values differ per call: never cached (the cache of others is bounded)."""

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

_MAX_CACHED = 8192
_HAS_IS_REMOTE = int(SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK)
_IS_REMOTE = int(SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK)
_KIND_VALUES = {kind: int(value) for kind, value in _SPAN_KIND_MAP.items()}


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = tuple(_encode_varint(value) for value in range(1 << 14))


def _varint(value: int) -> bytes:
    return _SMALL_VARINTS[value] if 0 <= value < 16384 else _encode_varint(value)


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


# Tags (field number << 3 | wire type) of the fields written here.
_SPAN_TRACE_ID = b"\x0a\x10"  # 1, 16 bytes
_SPAN_SPAN_ID = b"\x12\x08"  # 2, 8 bytes
_SPAN_TRACE_STATE = b"\x1a"  # 3
_SPAN_PARENT_ID = b"\x22\x08"  # 4, 8 bytes
_SPAN_NAME = b"\x2a"  # 5
_SPAN_KIND = b"\x30"  # 6, varint
_SPAN_START = b"\x39"  # 7, fixed64
_SPAN_END = b"\x41"  # 8, fixed64
_SPAN_ATTRIBUTE = b"\x4a"  # 9
_SPAN_DROPPED_ATTRIBUTES = b"\x50"  # 10, varint
_SPAN_EVENT = b"\x5a"  # 11
_SPAN_DROPPED_EVENTS = b"\x60"  # 12, varint
_SPAN_LINK = b"\x6a"  # 13
_SPAN_DROPPED_LINKS = b"\x70"  # 14, varint
_SPAN_STATUS = b"\x7a"  # 15
_SPAN_FLAGS = b"\x85\x01"  # 16, fixed32
_EVENT_TIME_TAG = b"\x09"  # Event 1, fixed64
_EVENT_NAME = b"\x12"  # Event 2
_EVENT_ATTRIBUTE = b"\x1a"  # Event 3 (the span's attribute tag is one byte too)
_EVENT_DROPPED_ATTRIBUTES = b"\x20"  # Event 4, varint
_EVENT_TIME = struct.Struct("<cQ")
_SCOPE_SPANS_SCOPE = b"\x0a"
_SCOPE_SPANS_SPAN = b"\x12"
_SCOPE_SPANS_SCHEMA = b"\x1a"
_RESOURCE_SPANS_RESOURCE = b"\x0a"
_RESOURCE_SPANS_SCOPE_SPANS = b"\x12"
_RESOURCE_SPANS_SCHEMA = b"\x1a"
_REQUEST_RESOURCE_SPANS = b"\x0a"
_LOCAL_FLAGS = _SPAN_FLAGS + _HAS_IS_REMOTE.to_bytes(4, "little")
_REMOTE_PARENT_FLAGS = _SPAN_FLAGS + (_HAS_IS_REMOTE | _IS_REMOTE).to_bytes(4, "little")


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_UINT64_MASK = (1 << 64) - 1
_UNSET_STATUS = (0, None)
_CACHEABLE = frozenset({str, int, float, bool})


_IDS = struct.Struct(">2sQQ2sQ")  # trace id (tag, two big-endian halves), span id (tag, big-endian)
_PARENT = struct.Struct(">2sQ")
_TIMES = struct.Struct("<cQcQ")  # start and end time (tag, fixed64 little-endian each)
_LOW_64 = (1 << 64) - 1
_KEY_PREFIXES: dict[str, bytes] = {}


def _key_prefix(key: str) -> bytes:
    """``KeyValue.key`` of ``key``, encoded (cached: attribute keys are few)."""
    prefix = _KEY_PREFIXES.get(key)
    if prefix is None:
        name = key.encode()
        prefix = b"\x0a" + _varint(len(name)) + name
        if len(_KEY_PREFIXES) < _MAX_CACHED:
            _KEY_PREFIXES[key] = prefix
    return prefix


def _attribute_field(key: str, value: Any) -> bytes:
    """A span's ``attributes`` field (``KeyValue``) for one attribute, written by hand for scalars."""
    if type(value) is str:  # the usual uncached value (a correlation id): the shortest path
        encoded = value.encode()
        size = len(encoded)
        if size < 120:  # every length prefix below is one byte
            prefix = _key_prefix(key)
            return b"".join(
                (
                    _SPAN_ATTRIBUTE,
                    _SMALL_VARINTS[len(prefix) + size + 4],
                    prefix,
                    b"\x12",
                    _SMALL_VARINTS[size + 2],
                    b"\x0a",
                    _SMALL_VARINTS[size],
                    encoded,
                )
            )
        any_value = b"\x0a" + _varint(size) + encoded
    elif isinstance(value, str):
        encoded = value.encode()
        any_value = b"\x0a" + _varint(len(encoded)) + encoded  # AnyValue.string_value
    elif isinstance(value, bool):
        any_value = b"\x10\x01" if value else b"\x10\x00"  # AnyValue.bool_value
    elif isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX:
        any_value = b"\x18" + _varint(value & _UINT64_MASK)  # AnyValue.int_value (two's complement)
    elif isinstance(value, float):
        any_value = b"\x21" + struct.pack("<d", value)  # AnyValue.double_value
    else:  # arrays, bytes, out-of-range ints: the SDK's encoder
        return b"".join(
            _length_delimited(_SPAN_ATTRIBUTE, pair.SerializeToString())
            for pair in _encode_attributes({key: value})
        )
    pair = _key_prefix(key) + b"\x12" + _varint(len(any_value)) + any_value
    return _SPAN_ATTRIBUTE + _varint(len(pair)) + pair


MAX_REQUEST_BYTES = 2 * 1024 * 1024
"""Largest export request ``CachingOtlpSpanExporter`` sends (half of gRPC's default receive limit)."""

_Encoded = tuple[Any, Any, bytes]  # (resource, scope or None, the Span message)


class EncodedSpans:
    """One serialized ``ExportTraceServiceRequest`` and how many spans it holds."""

    __slots__ = ("count", "request")

    def __init__(self, request: bytes, count: int) -> None:
        self.request = request
        self.count = count

    def __len__(self) -> int:
        return self.count


class SpanEncoder:
    """Writes ``ExportTraceServiceRequest`` bytes; caches the bytes of repeated attributes and statuses.

    Takes SDK ``ReadableSpan``s and rpcmesh ``CallSpan``s (``accepts_call_spans``): a ``CallSpan``
    is encoded from its own fields, its shared per-method attributes as one cached block.
    """

    def __init__(self) -> None:
        self._pairs: dict[tuple[str, type, Any], bytes] = {}
        self._statuses: dict[tuple[int, str | None], bytes] = {}
        # Keyed by id(); each entry keeps its object alive, so an id is never reused while cached.
        self._blocks: dict[int, tuple[Any, bytes]] = {}
        self._names: dict[tuple[str, Any], bytes] = {}
        # Equal scopes held as different objects (rpcmesh's call spans and the SDK tracer's spans)
        # share one ScopeSpans, as the SDK's encoder groups them: id -> (scope, first equal one seen).
        self._scope_ids: dict[int, tuple[Any, Any]] = {}
        self._scopes: dict[Any, Any] = {}

    def _pair(self, key: str, value: Any) -> bytes:
        if key in UNCACHED_ATTRIBUTES or not isinstance(value, str | int | float | bool):
            return _attribute_field(key, value)
        cache_key = (key, type(value), value)
        encoded = self._pairs.get(cache_key)
        if encoded is None:
            encoded = _attribute_field(key, value)
            if len(self._pairs) >= _MAX_CACHED:  # a high-cardinality attribute: start over, stay bounded
                self._pairs.clear()
            self._pairs[cache_key] = encoded
        return encoded

    def _attributes(self, attributes: Any, parts: list[bytes]) -> None:
        pair = self._pair
        for key, value in attributes.items():
            parts.append(pair(key, value))

    def _block(self, attributes: Mapping[str, Any]) -> bytes:
        """The encoded attributes of a shared (per-method) mapping, cached while it lives."""
        cached = self._blocks.get(id(attributes))
        if cached is not None and cached[0] is attributes:
            return cached[1]
        parts: list[bytes] = []
        self._attributes(attributes, parts)
        encoded = b"".join(parts)
        if len(self._blocks) >= _MAX_CACHED:
            self._blocks.clear()
        self._blocks[id(attributes)] = (attributes, encoded)
        return encoded

    def _name_kind(self, name: str, kind: Any) -> bytes:
        encoded = self._names.get((name, kind))
        if encoded is None:
            encoded = _length_delimited(_SPAN_NAME, name.encode()) if name else b""
            value = _KIND_VALUES[kind]
            if value:
                encoded += _SPAN_KIND + _varint(value)
            if len(self._names) >= _MAX_CACHED:
                self._names.clear()
            self._names[(name, kind)] = encoded
        return encoded

    def _status_bytes(self, key: tuple[int, str | None]) -> bytes:
        encoded = self._statuses.get(key)
        if encoded is None:
            encoded = _length_delimited(_SPAN_STATUS, Status(code=key[0], message=key[1]).SerializeToString())  # type: ignore[arg-type]
            if len(self._statuses) < _MAX_CACHED:
                self._statuses[key] = encoded
        return encoded

    def call_span(self, span: CallSpan) -> bytes:
        """One ``Span`` message of a ``CallSpan`` (the same message as its ``to_readable()``)."""
        context = span._context
        parent = span._parent
        trace_id = context.trace_id
        parts = [
            _IDS.pack(_SPAN_TRACE_ID, trace_id >> 64, trace_id & _LOW_64, _SPAN_SPAN_ID, context.span_id)
        ]
        state = context.trace_state
        if state:
            parts.append(_length_delimited(_SPAN_TRACE_STATE, (_encode_trace_state(state) or "").encode()))
        if parent is not None:
            parts.append(_PARENT.pack(_SPAN_PARENT_ID, parent.span_id))
        parts.append(self._name_kind(span._name, span._kind))
        parts.append(_TIMES.pack(_SPAN_START, span._start, _SPAN_END, span._end or 0))
        base = span._base
        own = span._attributes
        if own and base and not base.keys().isdisjoint(own):  # own values replace shared ones
            self._attributes({**base, **own}, parts)
        else:
            if base:
                parts.append(self._block(base))
            if own:
                pairs = self._pairs
                for key, value in own.items():
                    if key in UNCACHED_ATTRIBUTES:
                        parts.append(_attribute_field(key, value))
                        continue
                    encoded = pairs.get((key, type(value), value)) if type(value) in _CACHEABLE else None
                    parts.append(encoded if encoded is not None else self._pair(key, value))
        if span._events:
            parts += map(self._event, span._events)
        status = span._status
        parts.append(
            self._status_bytes((int(status.status_code.value), status.description))
            if status is not None
            else self._status_bytes(_UNSET_STATUS)
        )
        parts.append(_REMOTE_PARENT_FLAGS if parent is not None and parent.is_remote else _LOCAL_FLAGS)
        return b"".join(parts)

    def _event(self, event: Event) -> bytes:
        """A span's ``events`` field for one event, its attributes through the attribute cache."""
        parts: list[bytes] = []
        if event.timestamp:
            parts.append(_EVENT_TIME.pack(_EVENT_TIME_TAG, event.timestamp))
        if event.name:
            parts.append(_length_delimited(_EVENT_NAME, event.name.encode()))
        if event.attributes:
            for key, value in event.attributes.items():
                field = self._pair(key, value)
                if field:  # the same KeyValue, as Event.attributes (field 3) instead of Span.attributes
                    parts.append(_EVENT_ATTRIBUTE + field[len(_SPAN_ATTRIBUTE) :])
        if event.dropped_attributes:
            parts.append(_EVENT_DROPPED_ATTRIBUTES + _varint(event.dropped_attributes))
        return _length_delimited(_SPAN_EVENT, b"".join(parts))

    def _status(self, status: Any) -> bytes:
        return self._status_bytes((int(status.status_code.value), status.description))

    def span(self, span: ReadableSpan) -> bytes:
        """One ``Span`` message (without its own tag)."""
        context = span.get_span_context()
        assert context is not None
        parent = span.parent
        parts = [
            _SPAN_TRACE_ID,
            context.trace_id.to_bytes(16, "big"),
            _SPAN_SPAN_ID,
            context.span_id.to_bytes(8, "big"),
        ]
        state = _encode_trace_state(context.trace_state)
        if state:
            parts.append(_length_delimited(_SPAN_TRACE_STATE, state.encode()))
        if parent is not None:
            parts += (_SPAN_PARENT_ID, parent.span_id.to_bytes(8, "big"))
        if span.name:
            parts.append(_length_delimited(_SPAN_NAME, span.name.encode()))
        kind = _KIND_VALUES[span.kind]
        if kind:
            parts += (_SPAN_KIND, _varint(kind))
        if span.start_time:
            parts += (_SPAN_START, span.start_time.to_bytes(8, "little"))
        if span.end_time:
            parts += (_SPAN_END, span.end_time.to_bytes(8, "little"))
        if span.attributes:
            self._attributes(span.attributes, parts)
        if span.dropped_attributes:
            parts += (_SPAN_DROPPED_ATTRIBUTES, _varint(span.dropped_attributes))
        if span.events:
            parts += map(self._event, span.events)
        if span.dropped_events:
            parts += (_SPAN_DROPPED_EVENTS, _varint(span.dropped_events))
        if span.links:
            for link in _encode_links(span.links) or ():
                parts.append(_length_delimited(_SPAN_LINK, link.SerializeToString()))
        if span.dropped_links:
            parts += (_SPAN_DROPPED_LINKS, _varint(span.dropped_links))
        if span.status is not None:
            parts.append(self._status(span.status))
        flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)
        parts += (_SPAN_FLAGS, flags.to_bytes(4, "little"))
        return b"".join(parts)

    def request(self, spans: Sequence[ReadableSpan | CallSpan]) -> bytes:
        """The serialized ``ExportTraceServiceRequest`` of ``spans``."""
        return self._assemble([self._encoded(span) for span in spans])

    def requests(
        self, spans: Sequence[ReadableSpan | CallSpan], max_bytes: int = MAX_REQUEST_BYTES
    ) -> list[EncodedSpans]:
        """``spans`` as requests of about ``max_bytes`` at most each, spans in order.

        A receiver refuses larger messages (gRPC's default limit is 4 MiB), so a large batch is
        sent as several requests; a single span larger than ``max_bytes`` goes alone.
        """
        out: list[EncodedSpans] = []
        chunk: list[_Encoded] = []
        size = 0
        for span in spans:
            item = self._encoded(span)
            item_size = len(item[2]) + 4  # tag and length prefix
            if chunk and size + item_size > max_bytes:
                out.append(EncodedSpans(self._assemble(chunk), len(chunk)))
                chunk, size = [], 0
            chunk.append(item)
            size += item_size
        if chunk:
            out.append(EncodedSpans(self._assemble(chunk), len(chunk)))
        return out

    def _encoded(self, span: ReadableSpan | CallSpan) -> _Encoded:
        if isinstance(span, CallSpan):
            tracer = span._tracer
            return tracer.resource, tracer.instrumentation_scope or None, self.call_span(span)
        return span.resource, span.instrumentation_scope or None, self.span(span)

    def _assemble(self, encoded: Sequence[_Encoded]) -> bytes:
        groups: dict[tuple[int, int], tuple[Any, Any, list[bytes]]] = {}
        for resource, scope, span_bytes in encoded:
            if scope is not None:
                scope = self._canonical_scope(scope)
            key = (id(resource), id(scope))
            group = groups.get(key)
            if group is None:
                group = groups[key] = (resource, scope, [])
            group[2].extend((_SCOPE_SPANS_SPAN, _varint(len(span_bytes)), span_bytes))
        by_resource: dict[int, tuple[Any, list[bytes]]] = {}
        for resource, scope, encoded_spans in groups.values():
            parts = [self._scope_block(scope)]
            parts += encoded_spans
            if scope is not None and scope.schema_url:
                parts.append(_length_delimited(_SCOPE_SPANS_SCHEMA, scope.schema_url.encode()))
            scope_spans = _length_delimited(_RESOURCE_SPANS_SCOPE_SPANS, b"".join(parts))
            by_resource.setdefault(id(resource), (resource, []))[1].append(scope_spans)
        out: list[bytes] = []
        for resource, scope_spans_list in by_resource.values():
            parts = [self._resource_block(resource)]
            parts += scope_spans_list
            if resource.schema_url:
                parts.append(_length_delimited(_RESOURCE_SPANS_SCHEMA, resource.schema_url.encode()))
            out.append(_length_delimited(_REQUEST_RESOURCE_SPANS, b"".join(parts)))
        return b"".join(out)

    def _canonical_scope(self, scope: Any) -> Any:
        cached = self._scope_ids.get(id(scope))
        if cached is not None and cached[0] is scope:
            return cached[1]
        if len(self._scope_ids) >= _MAX_CACHED:
            self._scope_ids.clear()
            self._scopes.clear()
        canonical = self._scopes.setdefault(scope, scope)
        self._scope_ids[id(scope)] = (scope, canonical)
        return canonical

    def _scope_block(self, scope: Any) -> bytes:
        return self._cached_block(scope, _SCOPE_SPANS_SCOPE, _encode_instrumentation_scope)

    def _resource_block(self, resource: Any) -> bytes:
        return self._cached_block(resource, _RESOURCE_SPANS_RESOURCE, _encode_resource)

    def _cached_block(self, source: Any, field: bytes, encode: Callable[[Any], Message]) -> bytes:
        """``source`` (a scope or resource, immutable) encoded as ``field``, once per object."""
        cached = self._blocks.get(id(source))
        if cached is None or cached[0] is not source:
            encoded = _length_delimited(field, encode(source).SerializeToString())
            cached = self._blocks[id(source)] = (source, encoded)
        return cached[1]


def encode_spans_bytes(spans: Sequence[ReadableSpan], encoder: SpanEncoder | None = None) -> bytes:
    """The serialized ``ExportTraceServiceRequest`` that ``encode_spans`` would build."""
    return (encoder or SpanEncoder()).request(spans)


class _BytesTraceStub:
    """A TraceService stub that sends an already serialized request."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.Export: grpc.UnaryUnaryMultiCallable[bytes, ExportTraceServiceResponse] = channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )


class CachingOtlpSpanExporter(OTLPSpanExporter):
    """``OTLPSpanExporter`` (same arguments) encoding through ``SpanEncoder``.

    ``SpanPipeline`` hands it ``CallSpan``s as they are (``accepts_call_spans``), so rpcmesh's
    call spans are never turned into SDK ``ReadableSpan``s on their way out. A batch whose
    encoding exceeds ``MAX_REQUEST_BYTES`` goes out as several requests (``SpanEncoder.requests``),
    each with the SDK exporter's retries.
    """

    accepts_call_spans = True
    max_request_bytes = MAX_REQUEST_BYTES
    """Largest request sent; a larger batch is split."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._encoder = SpanEncoder()
        self._swapped = False
        super().__init__(*args, **kwargs)
        if not self._stub_swapped():
            # The SDK did not call the hook or keeps its stub elsewhere: bytes would reach a stub that
            # serializes messages and every export would fail. Export the stock way instead.
            private_api.register("otlp_exporter", False, "the exporter's bytes stub did not take effect")
            self.accepts_call_spans = False

    def _stub_swapped(self) -> bool:
        return self._swapped and isinstance(self.__dict__.get("_client"), _BytesTraceStub)

    def _initialize_channel_and_stub(self) -> None:
        # Called at construction and on reconnects: keep the SDK's channel, swap in the bytes stub.
        super()._initialize_channel_and_stub()  # type: ignore[no-untyped-call]
        channel = self.__dict__.get("_channel")
        if isinstance(channel, grpc.Channel):
            self.__dict__["_client"] = _BytesTraceStub(channel)
            self._swapped = True
        else:
            self._swapped = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Send ``spans`` in as few requests as ``max_request_bytes`` allows; FAILURE if any failed."""
        if not self._stub_swapped():  # the stock stub: the stock encoder (CallSpans made readable)
            readable = [span.to_readable() if isinstance(span, CallSpan) else span for span in spans]
            return super().export(readable)
        result = SpanExportResult.SUCCESS
        for encoded in self._encoder.requests(spans, self.max_request_bytes):
            if self._export(encoded) is not SpanExportResult.SUCCESS:  # type: ignore[arg-type]
                result = SpanExportResult.FAILURE
        return result

    def _translate_data(self, data: Any) -> Any:
        if not self._stub_swapped():
            return super()._translate_data(data)
        return data.request if isinstance(data, EncodedSpans) else self._encoder.request(data)


def span_exporter(**kwargs: Any) -> OTLPSpanExporter:
    """The OTLP span exporter: ``CachingOtlpSpanExporter``, or the stock one when its fast path is off."""
    if private_api.FAST["otlp_exporter"]:
        return CachingOtlpSpanExporter(**kwargs)
    return OTLPSpanExporter(**kwargs)
