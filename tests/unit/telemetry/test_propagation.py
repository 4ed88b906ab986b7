from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from rpcmesh.telemetry import (
    capture_trace_context,
    consumer_span,
    correlation_id,
    extract_message_context,
    inject_message_headers,
    inject_metadata,
    producer_span,
    record_dead_letter,
    use_correlation_id,
    use_trace_context,
)
from rpcmesh.telemetry._calls import split_address, split_method
from tests.unit.telemetry.conftest import Recorded


def test_split_method_and_address() -> None:
    assert split_method("/echo.v1.Echo/Echo") == ("echo.v1.Echo", "Echo")
    assert split_method(b"/rpcmesh.v1.Bus/Publish") == ("rpcmesh.v1.Bus", "Publish")
    assert split_method("garbage") == ("unknown", "garbage")
    assert split_address("ipv4:127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert split_address("ipv6:[::1]:5000") == ("::1", 5000)
    assert split_address("localhost:50051") == ("localhost", 50051)
    assert split_address("dns:///svc.local:443") == ("svc.local", 443)
    assert split_address("unix:/tmp/s.sock") == ("unix:/tmp/s.sock", None)
    assert split_address(None) == (None, None)


def test_headers_without_tracing_carry_only_the_correlation_id() -> None:
    with use_correlation_id("plain-1"):
        headers = inject_message_headers({"content-type": "x"})
    assert headers["x-correlation-id"] == "plain-1"
    assert "traceparent" not in headers  # no span is current
    assert extract_message_context(headers).correlation_id == "plain-1"


def test_inject_metadata_replaces_propagation_entries(recorded: Recorded) -> None:
    tracer = recorded.telemetry.tracer
    old = [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"), ("x-keep", "v")]
    with tracer.start_as_current_span("attempt") as span, use_correlation_id("md-1"):
        metadata = inject_metadata(old)
    keys = [k for k, _ in metadata]
    assert keys.count("traceparent") == 1
    assert ("x-keep", "v") in metadata
    assert ("x-correlation-id", "md-1") in metadata
    traceparent = dict(metadata)["traceparent"]
    assert format(span.get_span_context().span_id, "016x") in traceparent
    assert "rpcmesh.correlation_id=md-1" in dict(metadata)["baggage"]


def test_message_trace_continues_across_redeliveries(recorded: Recorded) -> None:
    telemetry = recorded.telemetry
    headers: dict[str, str] = {}
    with (
        use_correlation_id("bus-1"),
        producer_span("orders", headers, message_id="m1", telemetry=telemetry) as producer,
    ):
        pass
    assert headers["x-correlation-id"] == "bus-1"
    for attempt in (1, 2):
        with consumer_span(
            "orders",
            headers,
            message_id="m1",
            consumer_group="billing",
            delivery_attempt=attempt,
            telemetry=telemetry,
        ):
            assert correlation_id() == "bus-1"
            if attempt == 2:
                record_dead_letter("max deliveries", attempts=2, dead_letter_topic="orders.dlq")
    assert correlation_id() is None
    spans = recorded.spans.get_finished_spans()
    by_kind = {s.kind: s for s in spans}
    consumers = [s for s in spans if s.kind is SpanKind.CONSUMER]
    assert len(consumers) == 2
    p = by_kind[SpanKind.PRODUCER]
    assert p.name == "publish orders"
    assert p.attributes["messaging.destination.name"] == "orders"
    assert p.attributes["messaging.operation"] == "publish"
    assert p.attributes["rpcmesh.correlation_id"] == "bus-1"
    for c in consumers:
        assert c.context.trace_id == producer.get_span_context().trace_id
        assert c.parent is not None and c.parent.span_id == producer.get_span_context().span_id
        assert c.attributes["messaging.consumer.group.name"] == "billing"
        assert c.attributes["messaging.message.id"] == "m1"
        assert c.attributes["rpcmesh.correlation_id"] == "bus-1"
    assert consumers[1].attributes["messaging.rpcmesh.delivery_attempt"] == 2
    assert [e.name for e in consumers[1].events] == ["rpcmesh.dead_letter"]


def test_consumer_of_a_message_without_headers_gets_a_new_id(recorded: Recorded) -> None:
    with consumer_span("t", None, telemetry=recorded.telemetry):
        first = correlation_id()
    assert first is not None
    (span,) = recorded.spans.get_finished_spans()
    assert span.parent is None and span.attributes["rpcmesh.correlation_id"] == first


def test_saga_context_survives_serialisation(recorded: Recorded) -> None:
    tracer = recorded.telemetry.tracer
    with tracer.start_as_current_span("StartSaga") as start, use_correlation_id("saga-7"):
        stored = dict(capture_trace_context())
    # ... stored in the EventStore, coordinator restarts, nothing is current any more ...
    assert trace.get_current_span() is trace.INVALID_SPAN
    with use_trace_context(stored) as cid:
        assert cid == "saga-7" == correlation_id()
        with tracer.start_as_current_span("step reserve") as step:
            pass
    assert correlation_id() is None
    assert step.get_span_context().trace_id == start.get_span_context().trace_id
    finished = {s.name: s for s in recorded.spans.get_finished_spans()}
    assert finished["step reserve"].parent.span_id == start.get_span_context().span_id  # type: ignore[union-attr]


def test_capture_without_anything_current_still_has_an_id() -> None:
    stored = capture_trace_context()
    assert len(stored["x-correlation-id"]) == 32
    with use_trace_context(stored) as cid:
        assert cid == stored["x-correlation-id"]
