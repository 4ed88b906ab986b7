"""TelemetryConfig: what to export and where, from code or from the standard ``OTEL_*`` variables.

The environment is read only by an explicit ``TelemetryConfig.from_env()``, never at import.
One deliberate difference from the OpenTelemetry SDK's own defaults: with no exporter and
no OTLP endpoint configured at all, rpcmesh exports nothing (telemetry off) instead of
exporting OTLP to localhost:4317, so an unconfigured ``rpcmesh up`` costs nothing and logs
no export errors. Setting ``OTEL_EXPORTER_OTLP_ENDPOINT`` alone turns OTLP export on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

TRACE_EXPORTERS = frozenset({"otlp", "console", "none"})
"""Span exporters rpcmesh can build (``OTEL_TRACES_EXPORTER``)."""

METRIC_EXPORTERS = frozenset({"otlp", "console", "prometheus", "none"})
"""Metric exporters rpcmesh can build (``OTEL_METRICS_EXPORTER``)."""

SAMPLERS = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)
"""Samplers rpcmesh can build (``OTEL_TRACES_SAMPLER``)."""

EXEMPLAR_FILTERS = frozenset({"always_off", "always_on", "trace_based"})
"""Exemplar filters (``OTEL_METRICS_EXEMPLAR_FILTER``)."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class TelemetryConfigError(ValueError):
    """A telemetry setting is invalid; the message names the setting."""


@dataclass(frozen=True, kw_only=True)
class TelemetryConfig:
    """How rpcmesh records and exports traces and metrics.

    The default instance is telemetry off: no SDK objects are built and every
    rpcmesh telemetry hook takes its no-op path.
    """

    enabled: bool = True
    """False mirrors ``OTEL_SDK_DISABLED=true``: nothing is recorded at all."""

    service_name: str = "rpcmesh"
    """``service.name`` resource attribute (``OTEL_SERVICE_NAME``)."""

    resource_attributes: tuple[tuple[str, str], ...] = ()
    """Extra resource attributes (``OTEL_RESOURCE_ATTRIBUTES``)."""

    traces_exporters: tuple[str, ...] = ("none",)
    """Span exporters: any of ``otlp``, ``console``, ``none`` (``OTEL_TRACES_EXPORTER``)."""

    metrics_exporters: tuple[str, ...] = ("none",)
    """Metric exporters: ``otlp``, ``console``, ``prometheus``, ``none`` (``OTEL_METRICS_EXPORTER``)."""

    otlp_traces_endpoint: str | None = None
    """OTLP/gRPC endpoint for spans, e.g. ``http://127.0.0.1:4317``; None: the exporter's default."""

    otlp_metrics_endpoint: str | None = None
    """OTLP/gRPC endpoint for metrics; None: the exporter's default."""

    otlp_insecure: bool | None = None
    """Plaintext gRPC to the collector; None: decided by the endpoint's scheme (``http://`` is plaintext)."""

    otlp_headers: tuple[tuple[str, str], ...] = ()
    """Headers sent with every export (``OTEL_EXPORTER_OTLP_HEADERS``), e.g. an API key."""

    otlp_timeout_s: float = 10.0
    """Export timeout in seconds (``OTEL_EXPORTER_OTLP_TIMEOUT``, given there in milliseconds)."""

    sampler: str = "parentbased_always_on"
    """Sampler name (``OTEL_TRACES_SAMPLER``)."""

    sampler_ratio: float = 1.0
    """Ratio for the ``traceidratio`` samplers (``OTEL_TRACES_SAMPLER_ARG``), in [0, 1]."""

    span_queue_size: int = 65536
    """Ended spans held for export at most; more are dropped (``OTEL_BSP_MAX_QUEUE_SIZE``)."""

    span_batch_size: int = 4096
    """Spans per export batch (``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``).

    Larger than the OpenTelemetry SDK's 512: in a busy asyncio gRPC process each export call
    costs milliseconds of CPU whatever its size (bench_tracing: about 18 µs less server CPU per
    call at 4096). The OTLP exporter still splits a batch into requests of at most 2 MiB.
    """

    span_schedule_delay_s: float = 1.0
    """Longest an ended span waits before export (``OTEL_BSP_SCHEDULE_DELAY``, in ms there)."""

    exemplar_filter: str = "always_off"
    """Which measurements carry exemplars (``OTEL_METRICS_EXEMPLAR_FILTER``: ``always_off``,
    ``always_on``, ``trace_based``). Off by default, unlike the SDK: an exemplar offer costs about a
    third of each histogram record, on every call."""

    metric_export_interval_s: float = 60.0
    """Push interval of the periodic metric reader (``OTEL_METRIC_EXPORT_INTERVAL``, in ms there)."""

    prometheus_host: str = "127.0.0.1"
    """Address of the Prometheus scrape endpoint (``OTEL_EXPORTER_PROMETHEUS_HOST``)."""

    prometheus_port: int = 9464
    """Port of the Prometheus scrape endpoint (``OTEL_EXPORTER_PROMETHEUS_PORT``); 0 picks a free one."""

    propagate_correlation_when_off: bool = True
    """With telemetry off, rpcmesh interceptors still carry ``x-correlation-id`` (one contextvar read)."""

    extra: Mapping[str, str] = field(default_factory=dict)
    """Unrecognised ``OTEL_*`` variables seen by ``from_env``, kept for diagnostics only."""

    def __post_init__(self) -> None:
        if not self.service_name:
            raise TelemetryConfigError("service_name (OTEL_SERVICE_NAME) must not be empty")
        for name in self.traces_exporters:
            if name not in TRACE_EXPORTERS:
                raise TelemetryConfigError(
                    f"traces_exporters (OTEL_TRACES_EXPORTER): unknown exporter {name!r}; "
                    f"use one of {sorted(TRACE_EXPORTERS)}"
                )
        for name in self.metrics_exporters:
            if name not in METRIC_EXPORTERS:
                raise TelemetryConfigError(
                    f"metrics_exporters (OTEL_METRICS_EXPORTER): unknown exporter {name!r}; "
                    f"use one of {sorted(METRIC_EXPORTERS)}"
                )
        if self.sampler not in SAMPLERS:
            raise TelemetryConfigError(
                f"sampler (OTEL_TRACES_SAMPLER): unknown sampler {self.sampler!r}; "
                f"use one of {sorted(SAMPLERS)}"
            )
        if not 0.0 <= self.sampler_ratio <= 1.0:
            raise TelemetryConfigError(
                f"sampler_ratio (OTEL_TRACES_SAMPLER_ARG) must be in [0, 1], got {self.sampler_ratio}"
            )
        if self.otlp_timeout_s <= 0:
            raise TelemetryConfigError(
                f"otlp_timeout_s (OTEL_EXPORTER_OTLP_TIMEOUT) must be > 0, got {self.otlp_timeout_s}"
            )
        if self.span_queue_size < 1:
            raise TelemetryConfigError(
                f"span_queue_size (OTEL_BSP_MAX_QUEUE_SIZE) must be >= 1, got {self.span_queue_size}"
            )
        if not 1 <= self.span_batch_size <= self.span_queue_size:
            raise TelemetryConfigError(
                "span_batch_size (OTEL_BSP_MAX_EXPORT_BATCH_SIZE) must be in [1, span_queue_size], "
                f"got {self.span_batch_size}"
            )
        if self.span_schedule_delay_s <= 0:
            raise TelemetryConfigError(
                "span_schedule_delay_s (OTEL_BSP_SCHEDULE_DELAY) must be > 0, "
                f"got {self.span_schedule_delay_s}"
            )
        if self.exemplar_filter not in EXEMPLAR_FILTERS:
            raise TelemetryConfigError(
                f"exemplar_filter (OTEL_METRICS_EXEMPLAR_FILTER): unknown filter {self.exemplar_filter!r}; "
                f"use one of {sorted(EXEMPLAR_FILTERS)}"
            )
        if self.metric_export_interval_s <= 0:
            raise TelemetryConfigError(
                "metric_export_interval_s (OTEL_METRIC_EXPORT_INTERVAL) must be > 0, "
                f"got {self.metric_export_interval_s}"
            )
        if not 0 <= self.prometheus_port <= 65535:
            raise TelemetryConfigError(
                "prometheus_port (OTEL_EXPORTER_PROMETHEUS_PORT) must be in [0, 65535], "
                f"got {self.prometheus_port}"
            )
        for endpoint_field in ("otlp_traces_endpoint", "otlp_metrics_endpoint"):
            endpoint = getattr(self, endpoint_field)
            if endpoint is not None and not endpoint.strip():
                raise TelemetryConfigError(f"{endpoint_field} must not be blank")

    @property
    def traces_on(self) -> bool:
        """Whether spans are recorded (some exporter other than ``none``)."""
        return self.enabled and any(name != "none" for name in self.traces_exporters)

    @property
    def metrics_on(self) -> bool:
        """Whether metrics are recorded (some exporter other than ``none``)."""
        return self.enabled and any(name != "none" for name in self.metrics_exporters)

    @property
    def active(self) -> bool:
        """Whether any telemetry is recorded at all."""
        return self.traces_on or self.metrics_on

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> TelemetryConfig:
        """Build a config from the standard OpenTelemetry variables.

        Args:
            environ: The variables to read; ``os.environ`` when None.
            **overrides: Fields that win over the environment (e.g. a default ``service_name``).

        Returns:
            The validated config.

        Raises:
            TelemetryConfigError: A variable holds an invalid value; the message names it.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        values["enabled"] = not _flag(env, "OTEL_SDK_DISABLED", default=False)

        resource = _pairs(env.get("OTEL_RESOURCE_ATTRIBUTES", ""), "OTEL_RESOURCE_ATTRIBUTES")
        service_name = env.get("OTEL_SERVICE_NAME") or dict(resource).get("service.name")
        if service_name:
            values["service_name"] = service_name
        values["resource_attributes"] = tuple((k, v) for k, v in resource if k != "service.name")

        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
        traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or base
        metrics_endpoint = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or base
        values["otlp_traces_endpoint"] = traces_endpoint
        values["otlp_metrics_endpoint"] = metrics_endpoint
        # Nothing configured at all means off (see the module docstring); an endpoint alone means OTLP.
        values["traces_exporters"] = _names(
            env, "OTEL_TRACES_EXPORTER", "otlp" if traces_endpoint else "none"
        )
        values["metrics_exporters"] = _names(
            env, "OTEL_METRICS_EXPORTER", "otlp" if metrics_endpoint else "none"
        )
        if "OTEL_EXPORTER_OTLP_INSECURE" in env:
            values["otlp_insecure"] = _flag(env, "OTEL_EXPORTER_OTLP_INSECURE", default=False)
        values["otlp_headers"] = tuple(
            _pairs(env.get("OTEL_EXPORTER_OTLP_HEADERS", ""), "OTEL_EXPORTER_OTLP_HEADERS")
        )
        if env.get("OTEL_EXPORTER_OTLP_TIMEOUT"):
            values["otlp_timeout_s"] = _number(env, "OTEL_EXPORTER_OTLP_TIMEOUT") / 1000.0
        if env.get("OTEL_TRACES_SAMPLER"):
            values["sampler"] = env["OTEL_TRACES_SAMPLER"].strip().lower()
        if env.get("OTEL_TRACES_SAMPLER_ARG"):
            values["sampler_ratio"] = _number(env, "OTEL_TRACES_SAMPLER_ARG")
        for variable, name in (
            ("OTEL_BSP_MAX_QUEUE_SIZE", "span_queue_size"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "span_batch_size"),
        ):
            if env.get(variable):
                size = _number(env, variable)
                if size != int(size):
                    raise TelemetryConfigError(f"{variable} must be an integer, got {size}")
                values[name] = int(size)
        if env.get("OTEL_BSP_SCHEDULE_DELAY"):
            values["span_schedule_delay_s"] = _number(env, "OTEL_BSP_SCHEDULE_DELAY") / 1000.0
        if env.get("OTEL_METRICS_EXEMPLAR_FILTER"):
            values["exemplar_filter"] = env["OTEL_METRICS_EXEMPLAR_FILTER"].strip().lower()
        if env.get("OTEL_METRIC_EXPORT_INTERVAL"):
            values["metric_export_interval_s"] = _number(env, "OTEL_METRIC_EXPORT_INTERVAL") / 1000.0
        if env.get("OTEL_EXPORTER_PROMETHEUS_HOST"):
            values["prometheus_host"] = env["OTEL_EXPORTER_PROMETHEUS_HOST"]
        if env.get("OTEL_EXPORTER_PROMETHEUS_PORT"):
            port = _number(env, "OTEL_EXPORTER_PROMETHEUS_PORT")
            if port != int(port):
                raise TelemetryConfigError(f"OTEL_EXPORTER_PROMETHEUS_PORT must be an integer, got {port}")
            values["prometheus_port"] = int(port)
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def _flag(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise TelemetryConfigError(f"{name} must be true or false, got {raw!r}")


def _names(env: Mapping[str, str], name: str, default: str) -> tuple[str, ...]:
    raw = env.get(name) or default
    names = tuple(part.strip().lower() for part in raw.split(",") if part.strip())
    return names or ("none",)


def _number(env: Mapping[str, str], name: str) -> float:
    raw = env[name]
    try:
        return float(raw)
    except ValueError:
        raise TelemetryConfigError(f"{name} must be a number, got {raw!r}") from None


def _pairs(raw: str, name: str) -> list[tuple[str, str]]:
    """Parse ``k1=v1,k2=v2`` (W3C-baggage-like, values percent-encoded) as OTel's variables use."""
    pairs: list[tuple[str, str]] = []
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TelemetryConfigError(f"{name}: expected key=value, got {item.strip()!r}")
        pairs.append((unquote(key.strip()), unquote(value.strip())))
    return pairs
