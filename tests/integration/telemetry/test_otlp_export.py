"""rpcmesh's OTLP span exporter against a real OTLP/gRPC receiver: large batches arrive whole."""

from __future__ import annotations

import grpc

from rpcmesh.telemetry import TelemetryConfig, setup_telemetry
from rpcmesh.telemetry._calls import begin_client_call
from rpcmesh.telemetry.otlp import CachingOtlpSpanExporter
from tests.support.otlp_collector import OtlpCollector


def test_a_batch_over_the_request_limit_is_sent_as_several_requests(collector: OtlpCollector) -> None:
    exporter = CachingOtlpSpanExporter(endpoint=collector.endpoint, insecure=True)
    exporter.max_request_bytes = 4_000  # ~20 call spans per request
    telemetry = setup_telemetry(
        TelemetryConfig(service_name="big-batch", span_batch_size=300, span_schedule_delay_s=60),
        install=False,
        span_exporters=[exporter],
    )
    requests_sent = 0
    send = exporter._export

    def counting(data: object) -> object:
        nonlocal requests_sent
        requests_sent += 1
        return send(data)  # type: ignore[arg-type]

    exporter._export = counting  # type: ignore[method-assign]
    try:
        for _ in range(300):  # one full batch: exported at once by the pipeline's thread
            record, _ = begin_client_call(telemetry, "/echo.v1.Echo/Echo", None, "127.0.0.1:7")
            record.finish(grpc.StatusCode.OK)
        spans = collector.wait_for_spans(lambda spans: len(spans) >= 300, timeout=20)
    finally:
        telemetry.shutdown()
    assert len(spans) == 300
    assert len({span.span_id for span in spans}) == 300
    assert requests_sent >= 10
