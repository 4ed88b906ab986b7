"""Call-duration histograms aggregated by rpcmesh: the same data points the SDK's Histogram produces."""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader

from rpcmesh.telemetry import TelemetryConfig, setup_telemetry
from rpcmesh.telemetry.metrics import DURATION_BUCKETS_S

VALUES = [0.0001, 0.0005, 0.0007, 0.003, 0.003, 0.08, 12.0]
OK, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND


def _points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    found: list[Any] = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            found += [
                (scope.scope.name, metric, point)
                for metric in scope.metrics
                if metric.name == name
                for point in metric.data.data_points
            ]
    return found


def _sdk_reference(values: list[float]) -> Any:
    """What the SDK's own histogram reports for the same measurements."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    histogram = provider.get_meter("rpcmesh").create_histogram(
        "rpc.client.call.duration", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S
    )
    for value in values:
        histogram.record(value, {"rpc.method": "Echo"})
    ((_, _, point),) = _points(reader, "rpc.client.call.duration")
    provider.shutdown()
    return point


def test_aggregated_points_match_the_sdk_histogram() -> None:
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry(TelemetryConfig(), install=False, metric_readers=[reader])
    try:
        assert telemetry.metrics._record_client.__qualname__.startswith("DurationHistogram")  # type: ignore[attr-defined]
        for value in VALUES:
            telemetry.metrics.client_call("echo.v1.Echo", "Echo", OK, value)
        telemetry.metrics.client_call("echo.v1.Echo", "Echo", NOT_FOUND, 0.002)
        telemetry.metrics.server_call("echo.v1.Echo", "Echo", OK, 0.001)
        points = _points(reader, "rpc.client.call.duration")
        by_code = {point.attributes["rpc.grpc.status_code"]: point for _, _, point in points}
        scope, metric, _ = points[0]
        assert scope == "rpcmesh" and metric.unit == "s" and "client calls" in metric.description
        assert metric.data.aggregation_temporality is AggregationTemporality.CUMULATIVE
        reference = _sdk_reference(VALUES)
        ok = by_code[0]
        assert ok.attributes == {
            "rpc.system": "grpc",
            "rpc.service": "echo.v1.Echo",
            "rpc.method": "Echo",
            "rpc.grpc.status_code": 0,
        }
        assert tuple(ok.bucket_counts) == tuple(reference.bucket_counts)
        assert tuple(ok.explicit_bounds) == tuple(reference.explicit_bounds)
        assert (ok.count, ok.min, ok.max) == (reference.count, reference.min, reference.max)
        assert abs(ok.sum - reference.sum) < 1e-9
        assert by_code[5].count == 1
        (_, _, server) = _points(reader, "rpc.server.call.duration")[0]
        assert server.count == 1
        # Cumulative: a second collection reports everything since the start.
        telemetry.metrics.client_call("echo.v1.Echo", "Echo", OK, 0.004)
        again = {
            p.attributes["rpc.grpc.status_code"]: p for _, _, p in _points(reader, "rpc.client.call.duration")
        }
        assert again[0].count == len(VALUES) + 1 and again[5].count == 1
        assert again[0].start_time_unix_nano == ok.start_time_unix_nano
    finally:
        telemetry.shutdown()


def test_delta_reader_gets_each_interval_once_next_to_a_cumulative_one() -> None:
    delta = InMemoryMetricReader(preferred_temporality={Histogram: AggregationTemporality.DELTA})
    cumulative = InMemoryMetricReader()
    telemetry = setup_telemetry(TelemetryConfig(), install=False, metric_readers=[delta, cumulative])
    try:
        telemetry.metrics.server_call("s", "m", OK, 0.001)
        telemetry.metrics.server_call("s", "m", OK, 0.009)
        ((_, metric, first),) = _points(delta, "rpc.server.call.duration")
        assert metric.data.aggregation_temporality is AggregationTemporality.DELTA
        assert (first.count, first.min, first.max) == (2, 0.001, 0.009)
        assert _points(cumulative, "rpc.server.call.duration")[0][2].count == 2
        assert _points(delta, "rpc.server.call.duration") == []  # nothing new
        telemetry.metrics.server_call("s", "m", OK, 0.5)
        ((_, _, second),) = _points(delta, "rpc.server.call.duration")
        assert (second.count, second.min, second.max) == (1, 0.5, 0.5)
        assert second.start_time_unix_nano > first.time_unix_nano  # the empty collection in between
        assert _points(cumulative, "rpc.server.call.duration")[0][2].count == 3
    finally:
        telemetry.shutdown()


def test_other_metrics_and_durations_share_the_rpcmesh_scope() -> None:
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry(TelemetryConfig(), install=False, metric_readers=[reader])
    try:
        telemetry.metrics.bus_published("orders", 2)
        telemetry.metrics.client_call("s", "m", OK, 0.001)
        data = reader.get_metrics_data()
        assert data is not None
        (resource,) = data.resource_metrics
        (scope,) = resource.scope_metrics
        assert scope.scope.name == "rpcmesh"
        assert {m.name for m in scope.metrics} == {"rpcmesh.bus.published", "rpc.client.call.duration"}
    finally:
        telemetry.shutdown()


def test_exemplars_on_keep_the_sdk_histogram() -> None:
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry(
        TelemetryConfig(exemplar_filter="always_on"), install=False, metric_readers=[reader]
    )
    try:
        telemetry.metrics.client_call("s", "m", OK, 0.001)
        ((_, _, point),) = _points(reader, "rpc.client.call.duration")
        assert point.count == 1 and point.exemplars
    finally:
        telemetry.shutdown()
