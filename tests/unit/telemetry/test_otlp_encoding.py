"""The bytes-level OTLP span encoder writes what the SDK's encode_spans builds."""

from __future__ import annotations

import grpc
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Link, SpanKind

from rpcmesh.telemetry import TelemetryConfig, setup_telemetry
from rpcmesh.telemetry._calls import begin_client_call, begin_server_call
from rpcmesh.telemetry.otlp import SpanEncoder, encode_spans_bytes


class Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: object) -> SpanExportResult:
        self.spans.extend(spans)  # type: ignore[call-overload]
        return SpanExportResult.SUCCESS


def _spans() -> list[ReadableSpan]:
    keep = Keep()
    telemetry = setup_telemetry(
        TelemetryConfig(service_name="enc", resource_attributes=(("deployment.environment", "test"),)),
        install=False,
        span_exporters=[keep],
        simple_span_processor=True,
    )
    try:
        for code in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL, grpc.StatusCode.OK):
            metadata = [("x-a", "1"), ("tracestate", "vendor=1")]
            record, sent = begin_client_call(telemetry, "/echo.v1.Echo/Echo", metadata, "127.0.0.1:7")
            server = begin_server_call(telemetry, "/echo.v1.Echo/Echo", [*sent, ("tracestate", "vendor=1")])
            if code == grpc.StatusCode.OK:
                server.finish(code)
            else:
                server.finish_with_error(RuntimeError("boom"))
            record.finish(code, "failed" if code != grpc.StatusCode.OK else None)
        with telemetry.tracer.start_as_current_span("sdk span", kind=SpanKind.PRODUCER) as span:
            span.set_attribute("list", [1, 2])
            span.set_attribute("ratio", 0.5)
            span.set_attribute("flag", True)
            span.add_event("e", {"k": "v"})
            context = span.get_span_context()
        telemetry.tracer.start_span("linked", links=[Link(context, {"why": "because"})]).end()
    finally:
        telemetry.shutdown()
    return keep.spans


def test_same_message_as_the_sdk_encoder() -> None:
    spans = _spans()
    assert len(spans) == 8
    expected = encode_spans(spans)
    encoder = SpanEncoder()
    assert ExportTraceServiceRequest.FromString(encode_spans_bytes(spans, encoder)) == expected
    # From warm caches too, and byte for byte what protobuf serializes.
    assert encode_spans_bytes(spans, encoder) == expected.SerializeToString(deterministic=True)


class KeepCallSpans(SpanExporter):
    """Takes CallSpans as they are, as CachingOtlpSpanExporter does."""

    accepts_call_spans = True

    def __init__(self) -> None:
        self.spans: list[object] = []

    def export(self, spans: object) -> SpanExportResult:
        self.spans.extend(spans)  # type: ignore[call-overload]
        return SpanExportResult.SUCCESS


def test_call_spans_encode_as_their_readable_form() -> None:
    keep = KeepCallSpans()
    telemetry = setup_telemetry(
        TelemetryConfig(service_name="enc"), install=False, span_exporters=[keep], simple_span_processor=True
    )
    try:
        for index, code in enumerate((grpc.StatusCode.OK, grpc.StatusCode.INTERNAL, grpc.StatusCode.OK)):
            metadata = [("tracestate", "vendor=1")] if index == 2 else None
            record, sent = begin_client_call(telemetry, "/echo.v1.Echo/Echo", metadata, "127.0.0.1:7")
            server = begin_server_call(telemetry, "/echo.v1.Echo/Echo", [*sent, ("tracestate", "vendor=1")])
            assert server.span is not None and record.span is not None
            server.span.set_attribute("network.peer.port", 40000 + index)
            server.span.set_attribute("negative", -5)
            server.span.set_attribute("ratio", 0.25)
            server.span.set_attribute("flag", index == 1)
            server.span.set_attribute("list", ["a", "b"])
            server.span.set_attribute("long", "é" * (100 + index * 60))  # 1- and 2-byte length prefixes
            server.span.set_attribute("big", 1 << 70)  # beyond int64: the SDK's encoder decides
            record.span.set_attribute("rpc.method", "Renamed")  # replaces the shared per-method value
            if code == grpc.StatusCode.OK:
                server.finish(code)
            else:
                server.finish_with_error(RuntimeError("boom"))
            record.finish(code, "failed" if code != grpc.StatusCode.OK else None)
    finally:
        telemetry.shutdown()
    from rpcmesh.telemetry.spans import CallSpan

    spans = keep.spans
    assert len(spans) == 6 and all(isinstance(span, CallSpan) for span in spans)
    readable = [span.to_readable() for span in spans]  # type: ignore[attr-defined]
    expected = encode_spans(readable)
    encoder = SpanEncoder()
    for _ in range(2):  # cold and warm caches
        assert ExportTraceServiceRequest.FromString(encoder.request(spans)) == expected  # type: ignore[arg-type]
        assert encoder.request(spans) == expected.SerializeToString(deterministic=True)  # type: ignore[arg-type]


def test_large_batches_split_into_requests_under_the_byte_limit() -> None:
    spans = _spans() * 50  # 400 spans, a few hundred bytes each
    whole = ExportTraceServiceRequest.FromString(SpanEncoder().request(spans))
    all_ids = [span.span_id for rs in whole.resource_spans for ss in rs.scope_spans for span in ss.spans]

    requests = SpanEncoder().requests(spans, max_bytes=20_000)
    assert len(requests) > 3
    assert sum(len(encoded) for encoded in requests) == len(spans)
    ids: list[bytes] = []
    for encoded in requests:
        assert len(encoded.request) <= 20_000 + 1_000  # resource and scope blocks on top of the spans
        message = ExportTraceServiceRequest.FromString(encoded.request)
        found = [span.span_id for rs in message.resource_spans for ss in rs.scope_spans for span in ss.spans]
        assert len(found) == len(encoded)
        ids += found
    assert sorted(ids) == sorted(all_ids)  # every span once, none lost or repeated

    # Under the limit: one request, the same bytes as request(); a span over it goes alone.
    (single,) = SpanEncoder().requests(spans[:8])
    assert single.request == SpanEncoder().request(spans[:8])
    assert [len(encoded) for encoded in SpanEncoder().requests(spans[:3], max_bytes=10)] == [1, 1, 1]
