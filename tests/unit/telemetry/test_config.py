from __future__ import annotations

import pytest

from rpcmesh.telemetry import TelemetryConfig, TelemetryConfigError


def test_nothing_configured_means_off() -> None:
    config = TelemetryConfig.from_env({})
    assert not config.active
    assert config.service_name == "rpcmesh"


def test_endpoint_alone_turns_otlp_on() -> None:
    config = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert config.traces_exporters == ("otlp",)
    assert config.metrics_exporters == ("otlp",)
    assert config.otlp_traces_endpoint == "http://127.0.0.1:4317"
    assert config.traces_on and config.metrics_on


def test_standard_variables_are_read() -> None:
    config = TelemetryConfig.from_env(
        {
            "OTEL_SERVICE_NAME": "orders",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=a%20b",
            "OTEL_TRACES_EXPORTER": "console, otlp",
            "OTEL_METRICS_EXPORTER": "prometheus",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "collector:4317",
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key=secret",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
        }
    )
    assert config.service_name == "orders"
    assert dict(config.resource_attributes) == {"deployment.environment": "prod", "team": "a b"}
    assert config.traces_exporters == ("console", "otlp")
    assert config.metrics_exporters == ("prometheus",)
    assert config.otlp_traces_endpoint == "collector:4317"
    assert config.otlp_metrics_endpoint is None
    assert config.otlp_headers == (("api-key", "secret"),)
    assert config.otlp_timeout_s == 2.5
    assert config.sampler_ratio == 0.25
    assert config.metric_export_interval_s == 1.0
    assert config.prometheus_port == 0


def test_service_name_from_resource_attributes() -> None:
    config = TelemetryConfig.from_env({"OTEL_RESOURCE_ATTRIBUTES": "service.name=billing"})
    assert config.service_name == "billing"
    assert config.resource_attributes == ()


def test_sdk_disabled_wins() -> None:
    config = TelemetryConfig.from_env({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"})
    assert not config.active


def test_overrides_win() -> None:
    config = TelemetryConfig.from_env({"OTEL_SERVICE_NAME": "x"}, service_name="rpcmesh-controlplane")
    assert config.service_name == "rpcmesh-controlplane"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_METRICS_EXPORTER": "statsd"}, "OTEL_METRICS_EXPORTER"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_TRACES_SAMPLER_ARG": "half"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_SDK_DISABLED": "maybe"}, "OTEL_SDK_DISABLED"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "0"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
        ({"OTEL_EXPORTER_PROMETHEUS_PORT": "70000"}, "OTEL_EXPORTER_PROMETHEUS_PORT"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "novalue"}, "OTEL_RESOURCE_ATTRIBUTES"),
        ({"OTEL_SERVICE_NAME": ""}, None),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], names: str | None) -> None:
    if names is None:
        TelemetryConfig.from_env(env)  # empty means unset
        return
    with pytest.raises(TelemetryConfigError, match=names):
        TelemetryConfig.from_env(env)


def test_config_is_frozen_and_keyword_only() -> None:
    config = TelemetryConfig()
    with pytest.raises(AttributeError):
        config.service_name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        TelemetryConfig("x")  # type: ignore[misc]


def test_import_reads_no_environment_and_loads_no_sdk() -> None:
    import subprocess
    import sys

    code = (
        "import sys, rpcmesh.telemetry as t\n"
        "assert not any(m.startswith('opentelemetry.sdk') for m in sys.modules), 'sdk loaded'\n"
        "tel = t.setup_telemetry(t.TelemetryConfig.from_env({}), install=False)\n"
        "assert not tel.active\n"
        "assert not any(m.startswith('opentelemetry.sdk') for m in sys.modules), 'sdk loaded when off'\n"
    )
    env = {"OTEL_TRACES_EXPORTER": "bogus", "PATH": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
