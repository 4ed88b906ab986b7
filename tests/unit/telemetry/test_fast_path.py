"""The cheap call-span path: W3C traceparent/baggage helpers, CallTracer sampling, CallSpan, SpanPipeline."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from rpcmesh.telemetry.spans import CallSpan, CallTracer, SpanPipeline
from rpcmesh.telemetry.traceparent import (
    correlation_baggage,
    format_traceparent,
    own_baggage_only,
    parse_traceparent,
)


class Collecting(SpanExporter):
    def __init__(self) -> None:
        self.batches: list[list[ReadableSpan]] = []
        self.exported = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.batches.append(list(spans))
        self.exported.set()
        return SpanExportResult.SUCCESS

    @property
    def spans(self) -> list[ReadableSpan]:
        return [span for batch in self.batches for span in batch]


def test_traceparent_round_trip_matches_the_otel_propagator() -> None:
    header = format_traceparent(0xABC, 0x12, 0x03)
    assert header == "00-00000000000000000000000000000abc-0000000000000012-03"
    parsed = parse_traceparent(header, "vendor=1")
    assert parsed is not None
    reference = TraceContextTextMapPropagator().extract({"traceparent": header, "tracestate": "vendor=1"})
    from opentelemetry import trace

    expected = trace.get_current_span(reference).get_span_context()
    assert (parsed.trace_id, parsed.span_id, parsed.trace_flags, parsed.is_remote) == (
        expected.trace_id,
        expected.span_id,
        expected.trace_flags,
        True,
    )
    assert parsed.trace_state.to_header() == "vendor=1"
    # Built without SpanContext's constructor: the same tuple, field for field, as the SDK's own.
    assert parsed == expected and parsed.is_valid
    plain = parse_traceparent(header)
    assert plain == trace.SpanContext(
        0xABC, 0x12, is_remote=True, trace_flags=trace.TraceFlags(0x03), trace_state=trace.TraceState()
    )


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        "ff-00000000000000000000000000000abc-0000000000000012-01",  # forbidden version
        "00-00000000000000000000000000000000-0000000000000012-01",  # zero trace id
        "00-00000000000000000000000000000abc-0000000000000000-01",  # zero span id
        "00-00000000000000000000000000000ABC-0000000000000012-01",  # upper case
        "00-00000000000000000000000000000abc-0000000000000012-01-extra",  # v00 has 4 fields
    ],
)
def test_invalid_traceparents_are_ignored(value: str) -> None:
    assert parse_traceparent(value) is None


def test_later_versions_may_append_fields() -> None:
    assert parse_traceparent("01-00000000000000000000000000000abc-0000000000000012-01-what") is not None


def test_correlation_baggage_quotes_only_when_needed() -> None:
    assert correlation_baggage("abc-1.2_3") == "rpcmesh.correlation_id=abc-1.2_3"
    assert correlation_baggage("a/b:c") == "rpcmesh.correlation_id=a%2Fb%3Ac"
    assert own_baggage_only("rpcmesh.correlation_id=a%2Fb%3Ac") == "a/b:c"
    assert own_baggage_only("rpcmesh.correlation_id=abc") == "abc"
    assert own_baggage_only("rpcmesh.correlation_id=abc,tenant=x") is None
    assert own_baggage_only("tenant=x") is None
    assert own_baggage_only("rpcmesh.correlation_id=abc;prop=1") is None


def _tracer(sampler: str, ratio: float = 1.0, exporter: Collecting | None = None) -> CallTracer:
    pipeline = SpanPipeline([exporter or Collecting()], simple=True)
    return CallTracer(pipeline, sampler=sampler, ratio=ratio, resource=None, instrumentation_scope=None)


def _parent(sampled: bool) -> SpanContext:
    return SpanContext(7, 9, is_remote=True, trace_flags=TraceFlags(1 if sampled else 0))


def test_parent_based_sampling_follows_the_parent() -> None:
    tracer = _tracer("parentbased_traceidratio", ratio=0.0)
    assert tracer.sampled(_parent(True), 7)
    assert not tracer.sampled(_parent(False), 7)
    assert not tracer.sampled(None, 7)  # a root at ratio 0
    assert _tracer("parentbased_always_on").sampled(None, 1)
    assert not _tracer("parentbased_always_off").sampled(None, 1)
    # Not parent based: the root decision even under a sampled parent.
    assert not _tracer("always_off").sampled(_parent(True), 7)


def test_ratio_sampling_uses_the_low_64_bits_like_the_sdk() -> None:
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    tracer = _tracer("traceidratio", ratio=0.25)
    reference = TraceIdRatioBased(0.25)
    for trace_id in (1, 2**62, 2**62 + 1, 2**63, (5 << 64) | 3, (1 << 128) - 1):
        expected = reference.should_sample(None, trace_id, "x").decision.is_sampled()
        assert tracer.sampled(None, trace_id) is expected


def test_unsampled_calls_get_ids_only() -> None:
    exporter = Collecting()
    tracer = _tracer("parentbased_always_on", exporter=exporter)
    span = tracer.start("s/m", SpanKind.CLIENT, _parent(False), {"rpc.system": "grpc"}, {})
    assert isinstance(span, NonRecordingSpan)
    context = span.get_span_context()
    assert context.trace_id == 7 and context.span_id not in (0, 9) and not context.trace_flags.sampled
    span.end()
    assert exporter.batches == []


def test_call_span_exports_as_a_readable_span() -> None:
    exporter = Collecting()
    tracer = _tracer("parentbased_always_on", exporter=exporter)
    base = {"rpc.system": "grpc", "rpc.service": "s"}
    span = tracer.start("s/m", SpanKind.SERVER, _parent(True), base, {"rpcmesh.correlation_id": "c1"})
    assert isinstance(span, CallSpan) and span.is_recording()
    span.set_attribute("rpc.grpc.status_code", 13)
    span.set_attribute("ignored", None)  # type: ignore[arg-type]
    span.add_event("rpcmesh.attempt", {"rpcmesh.attempt": 2})
    span.record_exception(ValueError("boom"))
    span.set_status(StatusCode.ERROR, "INTERNAL: boom")
    span.end()
    span.end()  # idempotent
    span.set_attribute("late", 1)  # after end: ignored
    (exported,) = exporter.spans
    assert exported.name == "s/m" and exported.kind is SpanKind.SERVER
    assert exported.parent is not None and exported.parent.span_id == 9 and exported.parent.is_remote
    assert exported.context is not None and exported.context.trace_id == 7
    assert dict(exported.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "s",
        "rpcmesh.correlation_id": "c1",
        "rpc.grpc.status_code": 13,
    }
    assert [event.name for event in exported.events] == ["rpcmesh.attempt", "exception"]
    assert exported.events[1].attributes["exception.type"] == "ValueError"
    assert exported.status.status_code is StatusCode.ERROR
    assert exported.start_time is not None and exported.end_time is not None
    assert exported.end_time >= exported.start_time
    assert base == {"rpc.system": "grpc", "rpc.service": "s"}  # the shared dict is never written


def test_root_spans_get_fresh_random_ids() -> None:
    tracer = _tracer("parentbased_always_on")
    contexts = [tracer.start("x", SpanKind.CLIENT, None, {}, {}).get_span_context() for _ in range(50)]
    assert len({c.trace_id for c in contexts}) == 50
    assert all(c.is_valid and c.trace_flags.sampled and c.trace_flags.random_trace_id for c in contexts)


def test_batch_pipeline_exports_in_batches_and_on_shutdown() -> None:
    exporter = Collecting()
    pipeline = SpanPipeline([exporter], max_queue=10, max_batch=4, schedule_delay_s=30.0)
    tracer = CallTracer(pipeline, sampler="always_on", ratio=1.0, resource=None, instrumentation_scope=None)
    for _ in range(4):  # a full batch wakes the exporter thread long before the 30 s delay
        tracer.start("x", SpanKind.CLIENT, None, {}, {}).end()
    assert exporter.exported.wait(10)
    for _ in range(12):
        tracer.start("x", SpanKind.CLIENT, None, {}, {}).end()
    pipeline.shutdown()
    assert len(exporter.spans) + pipeline.dropped == 16
    assert all(len(batch) <= 4 for batch in exporter.batches)
    tracer.start("x", SpanKind.CLIENT, None, {}, {}).end()  # after shutdown: dropped, never raises
    assert len(exporter.spans) + pipeline.dropped == 17


def test_a_failing_exporter_never_reaches_the_caller() -> None:
    class Failing(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            raise RuntimeError("collector down")

    good = Collecting()
    pipeline = SpanPipeline([Failing(), good], simple=True)
    tracer = CallTracer(pipeline, sampler="always_on", ratio=1.0, resource=None, instrumentation_scope=None)
    tracer.start("x", SpanKind.CLIENT, None, {}, {}).end()
    assert len(good.spans) == 1


def test_start_call_span_uses_the_cheap_path_and_parents_on_the_current_span() -> None:
    from opentelemetry import trace

    from rpcmesh.telemetry import DISABLED, TelemetryConfig, setup_telemetry, start_call_span

    exporter = Collecting()
    telemetry = setup_telemetry(
        TelemetryConfig(service_name="own"),
        install=False,
        span_exporters=[exporter],
        simple_span_processor=True,
    )
    try:
        shared = {"rpc.service": "s"}
        outer = start_call_span(telemetry, "outer", attributes={"a": 1}, shared_attributes=shared)
        assert isinstance(outer, CallSpan)
        with trace.use_span(outer, end_on_exit=True):
            start_call_span(telemetry, "inner", kind=SpanKind.CLIENT).end()
        assert not start_call_span(DISABLED, "off").is_recording()
    finally:
        telemetry.shutdown()
    inner, outer_span = exporter.spans
    assert inner.parent is not None and outer_span.context is not None
    assert inner.parent.span_id == outer_span.context.span_id
    assert dict(outer_span.attributes or {}) == {"rpc.service": "s", "a": 1}
    assert shared == {"rpc.service": "s"}
