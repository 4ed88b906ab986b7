"""Every private-name fast path is probed at import and has a public fallback that works (issue 19 §4)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from rpcmesh.telemetry import TelemetryConfig, _calls, durations, otlp, private_api, setup_telemetry
from rpcmesh.telemetry.metrics import CLIENT_DURATION

FAST_PATHS = ("otlp_exporter", "duration_reader")


@pytest.fixture
def fresh_flags(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, bool]]:
    """Copies of the probe results, restored after the test."""
    for name in ("FAST", "PROBED", "REASONS"):
        monkeypatch.setattr(private_api, name, dict(getattr(private_api, name)))
    monkeypatch.setattr(private_api, "_forced_off", set())
    yield private_api.FAST


def test_every_fast_path_is_on_with_the_installed_sdk() -> None:
    assert all(private_api.FAST.get(name) for name in FAST_PATHS), (private_api.FAST, private_api.REASONS)


def test_a_failed_probe_turns_its_path_off_with_one_warning(
    fresh_flags: dict[str, bool], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Renamed(InMemoryMetricReader):
        def __init__(self) -> None:
            super().__init__()
            del self._instrument_class_temporality  # as if the SDK renamed its private attribute

    monkeypatch.setattr(durations, "InMemoryMetricReader", Renamed)
    with caplog.at_level(logging.WARNING, logger="rpcmesh.telemetry"):
        assert durations._probe_reader_internals() is None
        assert durations._probe_reader_internals() is None
    assert fresh_flags["duration_reader"] is False
    assert "AttributeError" in private_api.REASONS["duration_reader"]
    assert len([r for r in caplog.records if "duration_reader" in r.getMessage()]) == 1
    private_api.force_fallback("duration_reader", fast=True)  # never re-enables a failed probe
    assert fresh_flags["duration_reader"] is False


def test_forcing_a_fallback_before_the_probe_keeps_the_probe(fresh_flags: dict[str, bool]) -> None:
    del fresh_flags["duration_reader"], private_api.PROBED["duration_reader"]
    private_api.force_fallback("duration_reader")
    assert durations._probe_reader_internals() is not None  # probed, found, but forced off
    assert fresh_flags["duration_reader"] is False
    private_api.force_fallback("duration_reader", fast=True)
    assert fresh_flags["duration_reader"] is True


def test_durations_fall_back_to_histogram_record(fresh_flags: dict[str, bool]) -> None:
    private_api.force_fallback("duration_reader")
    reader = InMemoryMetricReader()
    assert durations.reader_supports(reader) is False
    telemetry = setup_telemetry(TelemetryConfig(service_name="dur"), install=False, metric_readers=[reader])
    try:
        recorder = getattr(telemetry.metrics, "_record_client", None)
        assert not isinstance(getattr(recorder, "__self__", None), durations.DurationHistogram)
        client, _ = _calls.begin_client_call(telemetry, "/echo.v1.Echo/Echo", None, "127.0.0.1:7")
        client.finish(grpc.StatusCode.OK)
        data = reader.get_metrics_data()
        assert data is not None
        points = [
            point
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == CLIENT_DURATION[0]
            for point in m.data.data_points
        ]
        assert [point.count for point in points] == [1]  # type: ignore[union-attr]
    finally:
        telemetry.shutdown()


def test_otlp_exporter_fallback_is_the_stock_exporter(fresh_flags: dict[str, bool]) -> None:
    fast = otlp.span_exporter(endpoint="127.0.0.1:1", insecure=True)
    private_api.force_fallback("otlp_exporter")
    stock = otlp.span_exporter(endpoint="127.0.0.1:1", insecure=True)
    assert type(fast) is otlp.CachingOtlpSpanExporter and type(stock) is OTLPSpanExporter
    fast.shutdown()
    stock.shutdown()


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
