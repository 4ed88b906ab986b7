"""Tracing off, metrics on: a caller's trace context passes through the client and server paths."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rpcmesh.telemetry import Telemetry, TelemetryConfig, setup_telemetry
from rpcmesh.telemetry._calls import begin_client_call, begin_server_call
from rpcmesh.telemetry.correlation import reset_correlation_id, set_correlation_id
from rpcmesh.telemetry.traceparent import parse_traceparent

METHOD = "/echo.v1.Echo/Echo"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def metrics_only() -> Iterator[Telemetry]:
    telemetry = setup_telemetry(TelemetryConfig(), install=False, metric_readers=[InMemoryMetricReader()])
    assert not telemetry.tracing and telemetry.metrics.enabled
    try:
        yield telemetry
    finally:
        telemetry.shutdown()


def test_client_keeps_the_trace_headers_it_was_given(metrics_only: Telemetry) -> None:
    given = [("traceparent", TRACEPARENT), ("tracestate", "v=1"), ("baggage", "k=v"), ("x-other", "1")]
    _, sent = begin_client_call(metrics_only, METHOD, given, None)
    headers = dict(sent)
    assert headers["traceparent"] == TRACEPARENT
    assert headers["tracestate"] == "v=1" and headers["baggage"] == "k=v" and headers["x-other"] == "1"
    assert headers["x-correlation-id"]


def test_client_without_trace_context_sends_only_the_correlation_id(metrics_only: Telemetry) -> None:
    _, sent = begin_client_call(metrics_only, METHOD, None, None)
    assert [key for key, _ in sent] == ["x-correlation-id"]


def test_untraced_service_passes_a_traced_callers_trace_on(metrics_only: Telemetry) -> None:
    traced = setup_telemetry(TelemetryConfig(), install=False, span_exporters=[InMemorySpanExporter()])
    try:
        caller, sent = begin_client_call(traced, METHOD, None, None)
    finally:
        traced.shutdown()
    assert caller.span is not None
    caller_context = caller.span.get_span_context()

    # The untraced server adopts the correlation id and makes the caller's context current ...
    server = begin_server_call(metrics_only, METHOD, sent)
    assert server.span is None and server.correlation == caller.correlation
    assert server.context is not None
    remote = trace.get_current_span(server.context).get_span_context()
    assert (remote.trace_id, remote.span_id, remote.is_remote) == (
        caller_context.trace_id,
        caller_context.span_id,
        True,
    )
    # ... so a nested call from its handler continues the same trace.
    token = otel_context.attach(server.context)  # what the handler wrapper does
    correlation_token = set_correlation_id(server.correlation)
    try:
        _, nested = begin_client_call(metrics_only, METHOD, None, None)
    finally:
        reset_correlation_id(correlation_token)
        otel_context.detach(token)
    headers = dict(nested)
    parent = parse_traceparent(headers["traceparent"])
    assert parent is not None and parent.trace_id == caller_context.trace_id
    assert parent.span_id == caller_context.span_id
    assert caller.correlation in headers["baggage"] and headers["x-correlation-id"] == caller.correlation


def test_untraced_service_keeps_every_baggage_entry_of_the_caller(metrics_only: Telemetry) -> None:
    sent = [("traceparent", TRACEPARENT), ("baggage", "tenant=acme,rpcmesh.correlation_id=corr-7")]
    server = begin_server_call(metrics_only, METHOD, sent)
    assert server.span is None and server.correlation == "corr-7"
    assert server.context is not None
    assert baggage.get_all(server.context) == {"tenant": "acme", "rpcmesh.correlation_id": "corr-7"}
    remote = trace.get_current_span(server.context).get_span_context()
    assert (f"{remote.trace_id:032x}", f"{remote.span_id:016x}") == (
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
    )


def test_untraced_service_without_trace_headers_builds_no_context(metrics_only: Telemetry) -> None:
    server = begin_server_call(metrics_only, METHOD, [("x-correlation-id", "plain-1")])
    assert server.context is None and server.correlation == "plain-1"
