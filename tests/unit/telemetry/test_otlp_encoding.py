"""The caching OTLP span encoder builds exactly what the SDK's encode_spans builds."""

from __future__ import annotations

import grpc
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from rpcmesh.telemetry import TelemetryConfig, setup_telemetry
from rpcmesh.telemetry._calls import begin_client_call, begin_server_call
from rpcmesh.telemetry.otlp import _Encoder, encode_spans_cached


class Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: object) -> SpanExportResult:
        self.spans.extend(spans)  # type: ignore[arg-type]
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
            record, sent = begin_client_call(telemetry, "/echo.v1.Echo/Echo", [("x-a", "1")], "127.0.0.1:7")
            server = begin_server_call(telemetry, "/echo.v1.Echo/Echo", sent)
            server.finish_with_error(RuntimeError("boom")) if code != grpc.StatusCode.OK else server.finish(
                code
            )
            record.finish(code, "failed" if code != grpc.StatusCode.OK else None)
        with telemetry.tracer.start_as_current_span("sdk span", kind=SpanKind.PRODUCER) as span:
            span.set_attribute("list", [1, 2])
            span.add_event("e", {"k": "v"})
    finally:
        telemetry.shutdown()
    return keep.spans


def test_same_message_as_the_sdk_encoder() -> None:
    spans = _spans()
    assert len(spans) == 7
    encoder = _Encoder()
    assert encode_spans_cached(spans, encoder) == encode_spans(spans)
    assert encode_spans_cached(spans, encoder) == encode_spans(spans)  # from the warm caches too
