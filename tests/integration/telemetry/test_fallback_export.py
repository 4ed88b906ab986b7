"""With every private-name fast path off, traced grpc.aio calls still reach a real OTLP collector.

The fallbacks (``rpcmesh.telemetry.private_api``) are what rpcmesh runs on when a newer
OpenTelemetry drops a private name: the stock ``OTLPSpanExporter`` and durations through
``Histogram.record``. An exporter whose bytes stub did not take effect exports the stock way.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import grpc.aio
import pytest
from echo.servicer import EchoServicer
from echo.v1 import echo_pb2, echo_pb2_grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from rpcmesh.telemetry import (
    TelemetryConfig,
    private_api,
    setup_telemetry,
    trace_aio_channel,
    trace_aio_server,
)
from rpcmesh.telemetry._calls import begin_client_call
from rpcmesh.telemetry.metrics import CLIENT_DURATION, SERVER_DURATION
from rpcmesh.telemetry.otlp import CachingOtlpSpanExporter
from tests.support.otlp_collector import OtlpCollector

FAST_PATHS = ("otlp_exporter", "duration_reader")


@pytest.fixture
def all_fallbacks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("FAST", "PROBED", "REASONS"):
        monkeypatch.setattr(private_api, name, dict(getattr(private_api, name)))
    private_api.FAST.update(dict.fromkeys(FAST_PATHS, False))
    yield


async def test_traced_calls_arrive_on_the_public_paths(all_fallbacks: None, collector: OtlpCollector) -> None:
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry(
        TelemetryConfig(
            service_name="fallback",
            traces_exporters=("otlp",),
            otlp_traces_endpoint=collector.endpoint,
            otlp_insecure=True,
            span_schedule_delay_s=0.05,
        ),
        install=False,
        metric_readers=[reader],
    )
    server = grpc.aio.server()
    echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer("s1"), trace_aio_server(server, telemetry))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        exporters = telemetry.call_tracer.pipeline._exporters  # type: ignore[union-attr]
        assert [type(e) for e in exporters] == [OTLPSpanExporter]  # the stock exporter
        address = f"127.0.0.1:{port}"
        async with trace_aio_channel(
            grpc.aio.insecure_channel(address), telemetry, target=address
        ) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            for word in ("a", "b", "c"):
                assert (await stub.Echo(echo_pb2.EchoRequest(message=word), timeout=10)).message == word
        spans = collector.wait_for_spans(lambda spans: len(spans) >= 6, timeout=20)
        data = reader.get_metrics_data()
    finally:
        await server.stop(None)
        telemetry.shutdown()
    clients = [s for s in spans if s.kind == "CLIENT"]
    servers = [s for s in spans if s.kind == "SERVER"]
    assert len(clients) == len(servers) == 3
    by_id = {s.span_id: s for s in clients}
    for span in servers:  # each server span is the child of its client span, in the same trace
        parent = by_id[span.parent_span_id]  # type: ignore[index]
        assert parent.trace_id == span.trace_id
        assert span.attributes["rpcmesh.correlation_id"] == parent.attributes["rpcmesh.correlation_id"]
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}  # type: ignore[union-attr]
    assert {CLIENT_DURATION[0], SERVER_DURATION[0]} <= names


class NoSwap(CachingOtlpSpanExporter):
    """As if the SDK stopped calling ``_initialize_channel_and_stub`` (the bytes stub is never installed)."""

    def _initialize_channel_and_stub(self) -> None:
        OTLPSpanExporter._initialize_channel_and_stub(self)  # type: ignore[no-untyped-call]


def test_a_failed_stub_swap_loses_no_span(monkeypatch: pytest.MonkeyPatch, collector: OtlpCollector) -> None:
    for name in ("FAST", "PROBED", "REASONS"):  # the failed swap turns the path off: restore after
        monkeypatch.setattr(private_api, name, dict(getattr(private_api, name)))
    exporter = NoSwap(endpoint=collector.endpoint, insecure=True)
    telemetry = setup_telemetry(
        TelemetryConfig(service_name="noswap", span_schedule_delay_s=0.05),
        install=False,
        span_exporters=[exporter],
    )
    try:
        for _ in range(20):
            record, _ = begin_client_call(telemetry, "/echo.v1.Echo/Echo", None, "127.0.0.1:7")
            record.finish(grpc.StatusCode.OK)
        spans = collector.wait_for_spans(lambda spans: len(spans) >= 20, timeout=20)
    finally:
        telemetry.shutdown()
    assert len({span.span_id for span in spans}) == 20
