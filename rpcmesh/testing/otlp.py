"""A real OTLP/gRPC receiver: collects spans and metrics sent by any OTLP exporter, for tests and demos.

Built on the ``opentelemetry-proto`` service definitions (``TraceService/Export``,
``MetricsService/Export``); runs a sync ``grpc.server`` in threads on 127.0.0.1, port 0,
so exporters in this process and in child processes can both reach it. Tests read what
arrived with ``wait_for_spans`` (polls; never sleeps a fixed time).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

_KINDS = {
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}


def _value(any_value: common_pb2.AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in any_value.kvlist_value.values}
    return getattr(any_value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


@dataclass(frozen=True)
class CollectedSpan:
    """One received span, with ids as lowercase hex."""

    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    attributes: dict[str, Any]
    status_code: int
    events: list[str] = field(default_factory=list)
    start_ns: int = 0
    end_ns: int = 0


@dataclass(frozen=True)
class CollectedMetric:
    """One received metric stream: name, the service that sent it, and its data points' attributes."""

    service: str
    name: str
    points: list[dict[str, Any]]


class OtlpCollector(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    """Receives OTLP/gRPC exports; ``endpoint`` is what exporters are pointed at."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self.spans: list[CollectedSpan] = []
        self.metrics: list[CollectedMetric] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` (plaintext)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start serving."""
        self._server.start()

    def stop(self) -> None:
        """Stop at once."""
        self._server.stop(None).wait(5)

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Both services name their method Export; dispatch on the request type."""
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            self._take_spans(request)
            return trace_service_pb2.ExportTraceServiceResponse()
        self._take_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def _take_spans(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        received: list[CollectedSpan] = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        CollectedSpan(
                            service=service,
                            name=span.name,
                            kind=_KINDS.get(span.kind, "UNSPECIFIED"),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex() or None,
                            attributes=_attributes(span.attributes),
                            status_code=span.status.code,
                            events=[event.name for event in span.events],
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        with self._lock:
            self.spans.extend(received)
            self._lock.notify_all()

    def _take_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        received: list[CollectedMetric] = []
        for resource_metrics in request.resource_metrics:
            service = str(_attributes(resource_metrics.resource.attributes).get("service.name", ""))
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    data = getattr(metric, metric.WhichOneof("data") or "gauge")
                    points = [_attributes(point.attributes) for point in data.data_points]
                    received.append(CollectedMetric(service=service, name=metric.name, points=points))
        with self._lock:
            self.metrics.extend(received)
            self._lock.notify_all()

    def wait_for_spans(
        self, predicate: Callable[[list[CollectedSpan]], bool], timeout: float = 30.0
    ) -> list[CollectedSpan]:
        """Wait until ``predicate(all spans so far)`` holds; fail with what arrived."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self.spans):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    summary = [(s.service, s.kind, s.name) for s in self.spans]
                    raise AssertionError(f"spans not received within {timeout}s; got {summary}")
                self._lock.wait(remaining)
            return list(self.spans)

    def wait_for_metric(self, service: str, name: str, timeout: float = 30.0) -> CollectedMetric:
        """Wait for a metric stream ``name`` from ``service``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for metric in self.metrics:
                    if metric.service == service and metric.name == name:
                        return metric
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({(m.service, m.name) for m in self.metrics})
                    raise AssertionError(f"metric {name} from {service} not received; got {names}")
                self._lock.wait(remaining)


@contextmanager
def running_collector() -> Iterator[OtlpCollector]:
    """A started collector, stopped on exit."""
    collector = OtlpCollector()
    collector.start()
    try:
        yield collector
    finally:
        collector.stop()


def render_trace_tree(spans: list[CollectedSpan], trace_id: str) -> str:
    """One trace as an indented tree: service, kind, name and duration of every span, in start order."""
    mine = sorted((s for s in spans if s.trace_id == trace_id), key=lambda s: s.start_ns)
    ids = {s.span_id for s in mine}
    children: dict[str | None, list[CollectedSpan]] = {}
    for span in mine:
        parent = span.parent_span_id if span.parent_span_id in ids else None
        children.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for span in children.get(parent, []):
            millis = (span.end_ns - span.start_ns) / 1e6
            error = "  ERROR" if span.status_code == 2 else ""
            lines.append(
                f"{'  ' * depth}{span.service:<14} {span.kind:<8} {span.name}  {millis:.1f} ms{error}"
            )
            walk(span.span_id, depth + 1)

    walk(None, 0)
    return "\n".join(lines)
