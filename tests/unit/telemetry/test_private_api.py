"""Every private-name fast path is probed at import and has a public fallback that works (issue 19 §4)."""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry import baggage, trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags, TraceState

from rpcmesh.telemetry import (
    CORRELATION_BAGGAGE_KEY,
    TelemetryConfig,
    _calls,
    aio_channel,
    durations,
    otlp,
    private_api,
    setup_telemetry,
    traceparent,
)
from rpcmesh.telemetry.metrics import CLIENT_DURATION

ALL = ("otlp_exporter", "duration_reader", "span_context_tuple", "context_keys", "aio_plain_callable")


@pytest.fixture
def fresh_flags(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, bool]]:
    """A copy of the probe results, restored after the test."""
    flags = dict(private_api.FAST)
    monkeypatch.setattr(private_api, "FAST", flags)
    monkeypatch.setattr(private_api, "REASONS", {})
    yield flags


def test_every_fast_path_is_on_with_the_installed_sdk() -> None:
    assert all(name in private_api.FAST for name in ALL), private_api.FAST
    assert all(private_api.FAST[name] for name in ALL), private_api.REASONS


def test_a_failed_probe_turns_its_path_off_with_one_warning(
    fresh_flags: dict[str, bool], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # SpanContext's tuple layout changed (here: fields swapped by the fake fast constructor).
    monkeypatch.setattr(
        traceparent,
        "_tuple_span_context",
        lambda trace_id, span_id, remote, flags, state: tuple.__new__(
            SpanContext, (span_id, trace_id, remote, TraceFlags(flags), state, True)
        ),
    )
    with caplog.at_level(logging.WARNING, logger="rpcmesh.telemetry"):
        assert traceparent._probe_tuple_layout() is False
        assert traceparent._probe_tuple_layout() is False
    assert fresh_flags["span_context_tuple"] is False
    warnings = [r for r in caplog.records if "span_context_tuple" in r.getMessage()]
    assert len(warnings) == 1


def test_span_context_fallback_builds_the_same_context(fresh_flags: dict[str, bool]) -> None:
    state = TraceState([("vendor", "1")])
    fast = traceparent.trusted_span_context(0xABC, 0x12, 1, state, remote=True)
    fresh_flags["span_context_tuple"] = False
    public = traceparent.trusted_span_context(0xABC, 0x12, 1, state, remote=True)
    assert public == fast and type(public) is SpanContext
    assert (public.trace_id, public.span_id, public.is_remote, public.trace_flags, public.trace_state) == (
        0xABC,
        0x12,
        True,
        TraceFlags(1),
        state,
    )
    assert public.is_valid


def test_context_keys_fallback_gives_the_handler_the_same_context(fresh_flags: dict[str, bool]) -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(
        TelemetryConfig(service_name="ctx"),
        install=False,
        span_exporters=[exporter],
        simple_span_processor=True,
    )
    try:
        seen = []
        for fast in (True, False):
            fresh_flags["context_keys"] = fast
            client, sent = _calls.begin_client_call(telemetry, "/echo.v1.Echo/Echo", None, "127.0.0.1:7")
            server = _calls.begin_server_call(telemetry, "/echo.v1.Echo/Echo", sent)
            span = trace.get_current_span(server.context)
            seen.append((span.is_recording(), baggage.get_baggage(CORRELATION_BAGGAGE_KEY, server.context)))
            assert span.get_span_context().trace_id == client.span.get_span_context().trace_id  # type: ignore[union-attr]
            server.finish(grpc.StatusCode.OK)
            client.finish(grpc.StatusCode.OK)
        assert seen[0][0] is seen[1][0] is True
        assert all(isinstance(correlation, str) and correlation for _, correlation in seen)
    finally:
        telemetry.shutdown()


def test_aio_channel_probe_and_fallback(
    fresh_flags: dict[str, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = types.ModuleType("grpc.aio._channel")  # grpc moved its multicallables elsewhere
    monkeypatch.setattr("importlib.import_module", lambda name: fake)
    assert aio_channel._probe_plain_callables() is False

    class Plain:  # looks like grpc.aio's own callable without interceptors
        _interceptors = None

    Plain.__module__ = "grpc.aio._channel"
    assert fresh_flags["aio_plain_callable"] is False
    assert aio_channel._plain_grpc_callable(Plain()) is False  # the span is made current around the call
    fresh_flags["aio_plain_callable"] = True
    assert aio_channel._plain_grpc_callable(Plain()) is True


def test_duration_reader_probe_and_fallback(
    fresh_flags: dict[str, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Renamed(InMemoryMetricReader):
        def __init__(self) -> None:
            super().__init__()
            del self._instrument_class_temporality  # the SDK renamed its private attribute

    monkeypatch.setattr(durations, "InMemoryMetricReader", Renamed)
    assert durations._probe_reader_internals() is None
    assert fresh_flags["duration_reader"] is False
    reader = InMemoryMetricReader()
    assert durations.reader_supports(reader) is False
    telemetry = setup_telemetry(TelemetryConfig(service_name="dur"), install=False, metric_readers=[reader])
    try:
        recorder = getattr(telemetry.metrics, "_record_client", None)
        assert not isinstance(getattr(recorder, "__self__", None), durations.DurationHistogram)
        client, _ = _calls.begin_client_call(telemetry, "/echo.v1.Echo/Echo", None, "127.0.0.1:7")
        client.finish(grpc.StatusCode.OK)
        data = reader.get_metrics_data()
        names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}  # type: ignore[union-attr]
        assert CLIENT_DURATION[0] in names
    finally:
        telemetry.shutdown()


def test_otlp_exporter_fallback_is_the_stock_exporter(fresh_flags: dict[str, bool]) -> None:
    assert type(otlp.span_exporter(endpoint="127.0.0.1:1", insecure=True)) is otlp.CachingOtlpSpanExporter
    fresh_flags["otlp_exporter"] = False
    assert type(otlp.span_exporter(endpoint="127.0.0.1:1", insecure=True)) is OTLPSpanExporter


class NoSwap(otlp.CachingOtlpSpanExporter):
    """As if the SDK stopped calling the hook (or kept its stub under another name)."""

    def _initialize_channel_and_stub(self) -> None:
        OTLPSpanExporter._initialize_channel_and_stub(self)  # type: ignore[no-untyped-call]


def test_an_exporter_whose_stub_swap_failed_exports_the_stock_way(
    fresh_flags: dict[str, bool], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="rpcmesh.telemetry"):
        exporter = NoSwap(endpoint="127.0.0.1:1", insecure=True)
    assert exporter.accepts_call_spans is False
    assert fresh_flags["otlp_exporter"] is False  # later exporters are the stock ones
    assert any("did not take effect" in r.getMessage() for r in caplog.records)
    exporter.shutdown()
