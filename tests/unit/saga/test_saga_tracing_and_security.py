"""Pure pieces of saga tracing (outcome labels, what StartSaga stores); the coordinator's client security."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.controlplane.saga.security import TOKEN_OVER_PLAINTEXT_WARNING, coordinator_client_security
from rpcmesh.controlplane.saga.tracing import saga_outcome, start_context, step_outcome
from rpcmesh.security.settings import SecuritySettings
from rpcmesh.security.tls import ServerTlsConfig
from rpcmesh.telemetry import DISABLED, Telemetry, TelemetryConfig, use_correlation_id

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_step_outcomes() -> None:
    assert step_outcome(code=0, sent=True) == "succeeded"
    assert step_outcome(code=14, sent=True) == "failed"
    assert step_outcome(code=14, sent=False) == "not_sent"
    assert saga_outcome("SAGA_STATE_FAILED_COMPENSATION") == "failed_compensation"


def test_start_context_with_tracing_off_keeps_the_callers_headers() -> None:
    metadata = {"traceparent": TRACEPARENT, "x-correlation-id": "corr-1", "x-other": "y"}
    assert start_context(metadata, DISABLED) == ({"traceparent": TRACEPARENT}, "corr-1")


def test_start_context_makes_a_correlation_id_when_none_is_valid() -> None:
    stored, correlation = start_context({"x-correlation-id": "bad id with spaces"}, DISABLED)
    assert stored == {} and len(correlation) == 32
    with use_correlation_id("from-handler"):  # what the server interceptor adopted wins
        assert start_context({"x-correlation-id": "corr-1"}, DISABLED)[1] == "from-handler"


def test_start_context_with_tracing_on_parents_steps_on_the_current_span() -> None:
    tracer = TracerProvider().get_tracer("test")
    telemetry = Telemetry(TelemetryConfig(), tracer=tracer)
    with tracer.start_as_current_span("StartSaga") as span, use_correlation_id("corr-2"):
        stored, correlation = start_context({"traceparent": TRACEPARENT}, telemetry)
    context = span.get_span_context()
    assert stored["traceparent"].startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
    assert "rpcmesh.correlation_id=corr-2" in stored["baggage"]
    assert correlation == "corr-2"
    # No span current (e.g. the server interceptor is off): the caller's headers are kept.
    assert start_context({"traceparent": TRACEPARENT}, telemetry)[0] == {"traceparent": TRACEPARENT}


def test_token_without_tls_is_left_out_with_a_warning_not_an_error() -> None:
    decided = coordinator_client_security(ControlPlaneConfig(), {"RPCMESH_TOKEN": "abc"})
    assert decided.security.token is None and decided.security.tls is None
    assert decided.warnings == (TOKEN_OVER_PLAINTEXT_WARNING,)


def test_token_over_plaintext_in_development_mode() -> None:
    decided = coordinator_client_security(
        ControlPlaneConfig(), {"RPCMESH_TOKEN": "abc", "RPCMESH_INSECURE": "1"}
    )
    assert decided.security.token == "abc" and decided.security.insecure and not decided.warnings
    config = ControlPlaneConfig(security=SecuritySettings(insecure=True))
    assert coordinator_client_security(config, {"RPCMESH_TOKEN": "abc"}).security.token == "abc"


def test_token_file_and_client_tls_from_the_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    env = {"RPCMESH_TOKEN_FILE": str(token_file), "RPCMESH_TLS_CA": str(tmp_path / "ca.crt")}
    decided = coordinator_client_security(ControlPlaneConfig(), env)
    assert decided.security.tls is not None and decided.security.tls.ca_file == tmp_path / "ca.crt"
    token = decided.security.token
    assert callable(token) and token() == "from-file"


def test_a_tls_control_plane_dials_itself_over_tls(tmp_path: Path) -> None:
    tls = ServerTlsConfig(
        cert_file=tmp_path / "s.crt", key_file=tmp_path / "s.key", ca_file=tmp_path / "ca.crt"
    )
    decided = coordinator_client_security(ControlPlaneConfig(security=SecuritySettings(tls=tls)), {})
    assert decided.security.tls is not None and decided.security.tls.ca_file == tmp_path / "ca.crt"
    assert decided.security.token is None and not decided.warnings


def test_nothing_set_is_plaintext() -> None:
    decided = coordinator_client_security(ControlPlaneConfig(), {})
    assert decided.security.tls is None and decided.security.token is None and not decided.warnings


@pytest.mark.parametrize("value", ["", "0", "no"])
def test_insecure_flag_needs_a_true_value(value: str) -> None:
    decided = coordinator_client_security(
        ControlPlaneConfig(), {"RPCMESH_TOKEN": "t", "RPCMESH_INSECURE": value}
    )
    assert decided.security.token is None
