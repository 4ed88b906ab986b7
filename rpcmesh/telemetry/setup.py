"""setup_telemetry: build tracer and meter providers from a TelemetryConfig.

``Telemetry`` is the handle every rpcmesh hook uses (interceptors, messaging and saga
helpers, metrics). ``get_telemetry()`` returns the one installed by the last
``setup_telemetry(..., install=True)``, or the shared disabled handle: with
telemetry off no SDK object exists and every hook takes its no-op path.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.metrics import Meter
from opentelemetry.trace import Tracer

from rpcmesh.telemetry.config import TelemetryConfig
from rpcmesh.telemetry.correlation import install_log_correlation
from rpcmesh.telemetry.metrics import MeshMetrics, OtelMeshMetrics

if TYPE_CHECKING:
    from rpcmesh.telemetry.spans import CallTracer

INSTRUMENTATION_NAME = "rpcmesh"
"""Instrumentation scope name of every span and instrument rpcmesh creates."""

logger = logging.getLogger(__name__)


class Telemetry:
    """What rpcmesh records into: a tracer, the metrics API, and the providers to flush and shut down.

    Attributes:
        config: The config it was built from.
        tracing: Whether spans are recorded (False: the interceptors skip all span work).
        tracer: The tracer (a no-op tracer when ``tracing`` is False).
        metrics: The metrics API (a no-op ``MeshMetrics`` when metrics are off).
        call_tracer: The cheap span path the call interceptors use (``spans.CallTracer``), built by
            ``setup_telemetry``; None (e.g. a handle built by hand around another tracer): they use
            ``tracer``.
    """

    def __init__(
        self,
        config: TelemetryConfig,
        *,
        tracer: Tracer | None = None,
        meter: Meter | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        prometheus_server: Any = None,
        call_tracer: Any = None,
        durations: Any = None,
    ) -> None:
        self.config = config
        self.tracing = tracer is not None
        self.tracer: Tracer = tracer if tracer is not None else trace.NoOpTracer()
        self.metrics: MeshMetrics = OtelMeshMetrics(meter, durations) if meter is not None else MeshMetrics()
        self.propagate_correlation = (
            self.tracing or self.metrics.enabled or config.propagate_correlation_when_off
        )
        self.call_tracer: CallTracer | None = call_tracer if self.tracing else None
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._prometheus_server = prometheus_server

    @property
    def active(self) -> bool:
        """Whether anything is recorded at all."""
        return self.tracing or self.metrics.enabled

    @property
    def prometheus_port(self) -> int | None:
        """The bound port of the Prometheus scrape endpoint, when one runs."""
        if self._prometheus_server is None:
            return None
        return int(self._prometheus_server.server_port)

    def force_flush(self, timeout_s: float = 10.0) -> None:
        """Export everything recorded so far."""
        millis = int(timeout_s * 1000)
        if self._tracer_provider is not None:
            self._tracer_provider.force_flush(millis)
        if self._meter_provider is not None:
            self._meter_provider.force_flush(millis)

    def shutdown(self) -> None:
        """Flush and stop exporters and the scrape endpoint; uninstall if installed."""
        global _current
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()
        if self._prometheus_server is not None:
            self._prometheus_server.shutdown()
            self._prometheus_server.server_close()
            self._prometheus_server = None
        with _lock:
            if _current is self:
                _current = DISABLED


DISABLED = Telemetry(TelemetryConfig())
"""The shared telemetry-off handle (only correlation ids travel)."""

_lock = threading.Lock()
_current = DISABLED


def get_telemetry() -> Telemetry:
    """The installed telemetry, or ``DISABLED``."""
    return _current


def install_telemetry(telemetry: Telemetry) -> None:
    """Make ``telemetry`` what ``get_telemetry()`` returns (and so what hooks default to)."""
    global _current
    with _lock:
        _current = telemetry


def setup_telemetry(
    config: TelemetryConfig | None = None,
    *,
    install: bool = True,
    set_otel_globals: bool = False,
    span_exporters: Sequence[Any] = (),
    metric_readers: Sequence[Any] = (),
    simple_span_processor: bool = False,
) -> Telemetry:
    """Build providers and exporters from ``config`` and return the handle.

    Args:
        config: What to export; ``TelemetryConfig.from_env()`` when None.
        install: Make it the default for every rpcmesh hook (``get_telemetry``).
        set_otel_globals: Also set OpenTelemetry's global tracer and meter providers, so
            other instrumented libraries in the process export through the same pipeline.
            OpenTelemetry allows this once per process.
        span_exporters: Extra span exporters (tests: an in-memory exporter); they turn tracing on.
        metric_readers: Extra metric readers (tests: ``InMemoryMetricReader``); they turn metrics on.
        simple_span_processor: Export each span as it ends instead of in batches (tests, debugging).
            Batches otherwise: one ``SpanPipeline`` (bounded queue, one exporter thread) for all
            exporters, sized by ``config.span_*``.

    Returns:
        The telemetry handle; call ``shutdown()`` when done.
    """
    config = config if config is not None else TelemetryConfig.from_env()
    tracing = config.traces_on or (config.enabled and bool(span_exporters))
    metering = config.metrics_on or (config.enabled and bool(metric_readers))
    if config.enabled:
        install_log_correlation()
    if not tracing and not metering:
        telemetry = Telemetry(config)
        if install:
            install_telemetry(telemetry)
        return telemetry

    # The SDK is imported only here: with telemetry off it is never loaded.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    resource = Resource.create({**dict(config.resource_attributes), "service.name": config.service_name})
    tracer = tracer_provider = meter = meter_provider = prometheus_server = call_tracer = durations = None
    if tracing:
        from rpcmesh.telemetry.spans import CallTracer

        tracer_provider, pipeline = _tracer_provider(config, resource, span_exporters, simple_span_processor)
        tracer = tracer_provider.get_tracer(INSTRUMENTATION_NAME)
        call_tracer = CallTracer(
            pipeline,
            sampler=config.sampler,
            ratio=config.sampler_ratio,
            resource=resource,
            # The scope the SDK's get_tracer(INSTRUMENTATION_NAME) gives its spans, built publicly.
            instrumentation_scope=InstrumentationScope(INSTRUMENTATION_NAME, ""),
        )
    if metering:
        meter_provider, prometheus_server, readers = _meter_provider(config, resource, metric_readers)
        meter = meter_provider.get_meter(INSTRUMENTATION_NAME)
        durations = _duration_histograms(config, resource, meter, readers)
    if set_otel_globals:
        if tracer_provider is not None:
            trace.set_tracer_provider(tracer_provider)
        if meter_provider is not None:
            otel_metrics.set_meter_provider(meter_provider)
    telemetry = Telemetry(
        config,
        tracer=tracer,
        meter=meter,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        prometheus_server=prometheus_server,
        call_tracer=call_tracer,
        durations=durations,
    )
    if install:
        install_telemetry(telemetry)
    return telemetry


def _duration_histograms(config: TelemetryConfig, resource: Any, meter: Any, readers: Sequence[Any]) -> Any:
    """The call-duration histograms aggregated by rpcmesh, attached to every reader; None: use the SDK.

    Only when the SDK would produce the same data: exemplars off and explicit-bucket histograms
    in every reader (``durations`` module).
    """
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from rpcmesh.telemetry.durations import (
        DurationHistogram,
        DurationHistograms,
        attach_to_reader,
        reader_supports,
    )
    from rpcmesh.telemetry.metrics import CLIENT_DURATION, DURATION_BUCKETS_S, SERVER_DURATION, rpc_attributes

    scope = InstrumentationScope(INSTRUMENTATION_NAME)  # get_meter(INSTRUMENTATION_NAME)'s, built publicly
    if config.exemplar_filter != "always_off" or not all(map(reader_supports, readers)):
        return None
    pair = tuple(
        DurationHistogram(name, unit, description, DURATION_BUCKETS_S, rpc_attributes)
        for name, unit, description in (CLIENT_DURATION, SERVER_DURATION)
    )
    histograms = DurationHistograms(pair, scope)
    for reader in readers:
        attach_to_reader(reader, histograms, resource)
    return pair


def _sampler(config: TelemetryConfig) -> Any:
    from opentelemetry.sdk.trace import sampling

    name = config.sampler
    if name == "always_on":
        return sampling.ALWAYS_ON
    if name == "always_off":
        return sampling.ALWAYS_OFF
    if name == "traceidratio":
        return sampling.TraceIdRatioBased(config.sampler_ratio)
    if name == "parentbased_always_off":
        return sampling.ParentBased(sampling.ALWAYS_OFF)
    if name == "parentbased_traceidratio":
        return sampling.ParentBased(sampling.TraceIdRatioBased(config.sampler_ratio))
    return sampling.ParentBased(sampling.ALWAYS_ON)


def _otlp_kwargs(config: TelemetryConfig, endpoint: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"timeout": config.otlp_timeout_s}
    if endpoint is not None:
        kwargs["endpoint"] = endpoint
    insecure = config.otlp_insecure
    if insecure is None and endpoint is not None:
        insecure = endpoint.startswith("http://") or "://" not in endpoint
    if insecure is not None:
        kwargs["insecure"] = insecure
    if config.otlp_headers:
        kwargs["headers"] = dict(config.otlp_headers)
    return kwargs


def _tracer_provider(
    config: TelemetryConfig, resource: Any, extra_exporters: Sequence[Any], simple: bool
) -> tuple[Any, Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    from rpcmesh.telemetry.spans import SpanPipeline

    provider = TracerProvider(resource=resource, sampler=_sampler(config))
    exporters: list[Any] = list(extra_exporters)
    if config.traces_on:
        for name in dict.fromkeys(config.traces_exporters):
            if name == "otlp":
                from rpcmesh.telemetry.otlp import span_exporter

                exporters.append(span_exporter(**_otlp_kwargs(config, config.otlp_traces_endpoint)))
            elif name == "console":
                exporters.append(ConsoleSpanExporter(out=sys.stderr))
    pipeline = SpanPipeline(
        exporters,
        simple=simple,
        max_queue=config.span_queue_size,
        max_batch=config.span_batch_size,
        schedule_delay_s=config.span_schedule_delay_s,
    )
    provider.add_span_processor(pipeline)
    return provider, pipeline


def _meter_provider(
    config: TelemetryConfig, resource: Any, extra_readers: Sequence[Any]
) -> tuple[Any, Any, list[Any]]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    readers: list[Any] = list(extra_readers)
    prometheus_server = None
    interval_ms = config.metric_export_interval_s * 1000
    if config.metrics_on:
        for name in dict.fromkeys(config.metrics_exporters):
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

                exporter = OTLPMetricExporter(**_otlp_kwargs(config, config.otlp_metrics_endpoint))
                readers.append(PeriodicExportingMetricReader(exporter, export_interval_millis=interval_ms))
            elif name == "console":
                readers.append(
                    PeriodicExportingMetricReader(
                        ConsoleMetricExporter(out=sys.stderr), export_interval_millis=interval_ms
                    )
                )
            elif name == "prometheus":
                reader, prometheus_server = _prometheus(config)
                readers.append(reader)
    from opentelemetry.sdk.metrics import (
        AlwaysOffExemplarFilter,
        AlwaysOnExemplarFilter,
        TraceBasedExemplarFilter,
    )

    exemplar_filter: Any
    if config.exemplar_filter == "always_on":
        exemplar_filter = AlwaysOnExemplarFilter()
    elif config.exemplar_filter == "trace_based":
        exemplar_filter = TraceBasedExemplarFilter()
    else:
        exemplar_filter = AlwaysOffExemplarFilter()
    provider = MeterProvider(resource=resource, metric_readers=readers, exemplar_filter=exemplar_filter)
    return provider, prometheus_server, readers


def _prometheus(config: TelemetryConfig) -> tuple[Any, Any]:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "OTEL_METRICS_EXPORTER=prometheus needs opentelemetry-exporter-prometheus and prometheus-client"
        ) from exc
    # A registry of our own, so two telemetry handles in one process (tests) do not collide.
    registry = CollectorRegistry(auto_describe=True)
    try:
        reader = PrometheusMetricReader(registry=registry)
    except TypeError:  # pragma: no cover - exporters before the registry argument use the global one
        from prometheus_client import REGISTRY

        reader, registry = PrometheusMetricReader(), REGISTRY
    server, _thread = start_http_server(
        config.prometheus_port, addr=config.prometheus_host, registry=registry
    )
    logger.info("Prometheus metrics on http://%s:%s/metrics", config.prometheus_host, server.server_port)
    return reader, server
