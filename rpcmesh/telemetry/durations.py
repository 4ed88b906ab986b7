"""Call-duration histograms aggregated by rpcmesh itself and handed to the SDK's readers at collection.

The OpenTelemetry Python SDK has no bound instruments: every ``Histogram.record`` cleans and
hashes its attribute set, takes the measurement consumer's path through every reader's
storage and a lock per view, which measured 25-40 µs per call per side under a busy gRPC
loop. RPC durations have few series (one per method and status code), so rpcmesh counts
them itself: ``DurationHistograms.record`` is a bucket search and a few additions under one
lock. At collection time ``attach_to_reader`` makes every reader's collection (periodic
OTLP export, Prometheus scrape, ``InMemoryMetricReader``) also return these histograms as
the SDK would have: same metric name, unit, description, attributes, explicit bucket
bounds, min/max, the reader's temporality (cumulative or delta).

``setup_telemetry`` uses this path only when the SDK would aggregate the same way (explicit
buckets, exemplars off) and the reader's private names it needs are there (probed at import,
``private_api`` fast path ``duration_reader``); otherwise the durations go through ``Histogram.record``.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.view import DefaultAggregation, ExplicitBucketHistogramAggregation
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from rpcmesh.telemetry import private_api


def _probe_reader_internals() -> Any:
    """The SDK's private histogram class if a reader still exposes what ``attach_to_reader`` uses, else None.

    Private names: ``sdk.metrics._internal.instrument._Histogram`` (the key of a reader's
    per-instrument temporality and aggregation), ``MetricReader._instrument_class_temporality``,
    ``_instrument_class_aggregation`` and ``_collect`` (replaced to add the histograms).
    """
    try:
        from opentelemetry.sdk.metrics._internal.instrument import _Histogram as histogram_class

        reader = InMemoryMetricReader()
        temporality = reader._instrument_class_temporality[histogram_class]
        aggregation = reader._instrument_class_aggregation[histogram_class]
        ok = (
            isinstance(temporality, AggregationTemporality)
            and isinstance(aggregation, DefaultAggregation)
            and "_collect" in vars(reader)
        )
    except Exception as error:  # any failure means: durations through Histogram.record
        private_api.probe_failed("duration_reader", error)
        return None
    if not private_api.register("duration_reader", ok, "MetricReader's private temporality/collect changed"):
        return None
    return histogram_class


_Histogram: Any = _probe_reader_internals()

# One series' state: [count, sum, min, max, bucket counts...].
_COUNT, _SUM, _MIN, _MAX, _BUCKETS = 0, 1, 2, 3, 4

Key = tuple[Any, ...]
"""A series key; ``attributes_of(key)`` gives its attributes."""


def _merge(into: dict[Key, list[Any]], source: Mapping[Key, list[Any]]) -> None:
    for key, point in source.items():
        target = into.get(key)
        if target is None:
            into[key] = list(point)
            continue
        target[_COUNT] += point[_COUNT]
        target[_SUM] += point[_SUM]
        if point[_MIN] < target[_MIN]:
            target[_MIN] = point[_MIN]
        if point[_MAX] > target[_MAX]:
            target[_MAX] = point[_MAX]
        for index in range(_BUCKETS, len(point)):
            target[index] += point[index]


class DurationHistogram:
    """One histogram instrument (e.g. ``rpc.client.call.duration``) aggregated in process.

    Args:
        name: Metric name.
        unit: Unit.
        description: Description.
        bounds: Explicit bucket bounds (ascending).
        attributes_of: The attribute dict of a series key (called at collection only).
    """

    def __init__(
        self,
        name: str,
        unit: str,
        description: str,
        bounds: Sequence[float],
        attributes_of: Callable[[Key], Mapping[str, Any]],
    ) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.bounds = tuple(bounds)
        self._attributes_of = attributes_of
        self._lock = threading.Lock()
        self._pending: dict[Key, list[Any]] = {}
        self._empty = [0, 0.0, math.inf, -math.inf] + [0] * (len(self.bounds) + 1)

    def record(self, key: Key, value: float) -> None:
        """Add one measurement to the series ``key`` (the call path: a few µs)."""
        index = _BUCKETS + bisect.bisect_left(self.bounds, value)
        with self._lock:
            point = self._pending.get(key)
            if point is None:
                point = self._pending[key] = self._empty.copy()
            point[_COUNT] += 1
            point[_SUM] += value
            if value < point[_MIN]:
                point[_MIN] = value
            if value > point[_MAX]:
                point[_MAX] = value
            point[index] += 1

    def take_pending(self) -> dict[Key, list[Any]]:
        """The measurements since the last call (and start over)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def points(self, series: Mapping[Key, list[Any]], start_ns: int, now_ns: int) -> list[HistogramDataPoint]:
        """SDK data points of ``series`` (those with at least one measurement)."""
        return [
            HistogramDataPoint(
                attributes=dict(self._attributes_of(key)),
                start_time_unix_nano=start_ns,
                time_unix_nano=now_ns,
                count=point[_COUNT],
                sum=point[_SUM],
                bucket_counts=tuple(point[_BUCKETS:]),
                explicit_bounds=self.bounds,
                min=point[_MIN],
                max=point[_MAX],
            )
            for key, point in series.items()
            if point[_COUNT]
        ]


class DurationHistograms:
    """The in-process histograms of one meter provider and their per-reader collection state.

    Args:
        histograms: The instruments.
        scope: The instrumentation scope they are reported under (rpcmesh's meter's).
    """

    def __init__(self, histograms: Sequence[DurationHistogram], scope: InstrumentationScope) -> None:
        self.histograms = list(histograms)
        self.scope = scope
        self._collect_lock = threading.Lock()
        self._start_ns = time.time_ns()
        self._cumulative: list[dict[Key, list[Any]]] = [{} for _ in self.histograms]
        # Per delta reader: the series since its last collection, and that collection's time.
        self._deltas: dict[int, tuple[list[dict[Key, list[Any]]], list[int]]] = {}

    def _fold(self) -> None:
        """Move pending measurements into the cumulative state and every delta reader's interval."""
        for index, histogram in enumerate(self.histograms):
            pending = histogram.take_pending()
            if not pending:
                continue
            _merge(self._cumulative[index], pending)
            for series, _ in self._deltas.values():
                _merge(series[index], pending)

    def metrics_for(self, reader: MetricReader) -> list[Metric]:
        """The histograms as ``reader`` wants them now (its temporality for histograms)."""
        temporality = reader._instrument_class_temporality.get(_Histogram, AggregationTemporality.CUMULATIVE)
        now_ns = time.time_ns()
        with self._collect_lock:
            if temporality is AggregationTemporality.DELTA and id(reader) not in self._deltas:
                self._deltas[id(reader)] = ([{} for _ in self.histograms], [self._start_ns])
            self._fold()
            if temporality is AggregationTemporality.DELTA:
                series_list, last = self._deltas[id(reader)]
                start_ns = last[0]
                last[0] = now_ns
                taken = [dict(series) for series in series_list]
                for series in series_list:
                    series.clear()
            else:
                start_ns = self._start_ns
                taken = [{key: list(point) for key, point in series.items()} for series in self._cumulative]
        metrics = []
        for histogram, series in zip(self.histograms, taken, strict=True):
            points = histogram.points(series, start_ns, now_ns)
            if points:
                metrics.append(
                    Metric(
                        name=histogram.name,
                        description=histogram.description,
                        unit=histogram.unit,
                        data=Histogram(data_points=points, aggregation_temporality=temporality),
                    )
                )
        return metrics


def reader_supports(reader: MetricReader) -> bool:
    """Whether ``reader`` aggregates histograms as ``DurationHistograms`` does (explicit buckets)."""
    if not private_api.FAST["duration_reader"]:
        return False  # the public path: Histogram.record
    aggregation = getattr(reader, "_instrument_class_aggregation", {}).get(_Histogram)
    return (
        isinstance(aggregation, DefaultAggregation | ExplicitBucketHistogramAggregation)
        and getattr(reader, "_collect", None) is not None
    )


def attach_to_reader(reader: MetricReader, histograms: DurationHistograms, resource: Any) -> None:
    """Make ``reader``'s collections include ``histograms`` (the reader is registered on a provider)."""
    collect: Any = reader._collect
    assert collect is not None

    def collect_with_histograms(metric_reader: MetricReader, timeout_millis: float = 10_000) -> Any:
        data: MetricsData | None = collect(metric_reader, timeout_millis=timeout_millis)
        metrics = histograms.metrics_for(metric_reader)
        if not metrics:
            return data
        if data is None or not data.resource_metrics:
            return MetricsData(
                resource_metrics=[
                    ResourceMetrics(
                        resource=resource,
                        scope_metrics=[
                            ScopeMetrics(
                                scope=histograms.scope,
                                metrics=metrics,
                                schema_url=histograms.scope.schema_url or "",
                            )
                        ],
                        schema_url=resource.schema_url,
                    )
                ]
            )
        resource_metrics = list(data.resource_metrics)
        first = resource_metrics[0]
        scopes = list(first.scope_metrics)
        for index, scope_metrics in enumerate(scopes):
            if scope_metrics.scope == histograms.scope:
                scopes[index] = ScopeMetrics(
                    scope=scope_metrics.scope,
                    metrics=[*scope_metrics.metrics, *metrics],
                    schema_url=scope_metrics.schema_url,
                )
                break
        else:
            scopes.append(
                ScopeMetrics(
                    scope=histograms.scope, metrics=metrics, schema_url=histograms.scope.schema_url or ""
                )
            )
        resource_metrics[0] = ResourceMetrics(
            resource=first.resource, scope_metrics=scopes, schema_url=first.schema_url
        )
        return MetricsData(resource_metrics=resource_metrics)

    reader._collect = collect_with_histograms
