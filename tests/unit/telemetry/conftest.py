from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rpcmesh.telemetry import Telemetry, TelemetryConfig, setup_telemetry


class Recorded:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        self.telemetry: Telemetry = setup_telemetry(
            TelemetryConfig(),
            install=False,
            span_exporters=[self.spans],
            metric_readers=[self.reader],
            simple_span_processor=True,
        )

    def metric_points(self, name: str) -> list[tuple[dict[str, object], object]]:
        data = self.reader.get_metrics_data()
        points: list[tuple[dict[str, object], object]] = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            value = getattr(point, "value", None)
                            if value is None:
                                value = point.count  # histogram
                            points.append((dict(point.attributes or {}), value))
        return points


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    rec = Recorded()
    try:
        yield rec
    finally:
        rec.telemetry.shutdown()
