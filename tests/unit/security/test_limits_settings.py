"""Concurrency tracking, limits validation, security settings and client-side refusals."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509

from rpcmesh.security.certs import create_ca, issue_certificate, write_development_set
from rpcmesh.security.client import ClientSecurity
from rpcmesh.security.limits import ConcurrencyTracker, Limits
from rpcmesh.security.settings import SecuritySettings, ServerSecurity
from rpcmesh.security.tls import ClientTlsConfig, ServerTlsConfig


def test_tracker_caps_connection_identity_and_streams() -> None:
    tracker = ConcurrencyTracker(
        Limits(max_calls_per_connection=2, max_calls_per_identity=3, max_watches_per_identity=1)
    )
    assert tracker.acquire_connection("c1") is None
    assert tracker.acquire_connection("c1") is None
    assert "connection" in (tracker.acquire_connection("c1") or "")
    tracker.release_connection("c1")
    assert tracker.acquire_connection("c1") is None
    assert tracker.acquire_identity("svc", "watch") is None
    assert "watch" in (tracker.acquire_identity("svc", "watch") or "")
    assert tracker.acquire_identity("svc", None) is None
    assert tracker.acquire_identity("svc", "subscription") is None
    assert "'svc'" in (tracker.acquire_identity("svc", None) or "")
    assert tracker.acquire_identity("other", None) is None
    tracker.release_identity("svc", "watch")
    assert tracker.acquire_identity("svc", "watch") is None
    assert tracker.in_flight(identity="svc") == 3


@pytest.mark.parametrize(
    "kwargs", [{"max_calls_per_connection": 0}, {"max_receive_message_bytes": 10}, {"keepalive_time_ms": -1}]
)
def test_limits_validated(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="limits"):
        Limits(**kwargs)


def test_server_options_carry_the_limits() -> None:
    options = dict(Limits().server_options())
    assert options["grpc.max_receive_message_length"] == 1536 * 1024
    assert options["grpc.max_metadata_size"] == 16 * 1024
    assert options["grpc.http2.max_ping_strikes"] == 2


def test_settings_refuse_tokens_over_plaintext_and_policy_without_authentication(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plaintext"):
        SecuritySettings(token_secret_file=tmp_path / "s")
    assert SecuritySettings(token_secret_file=tmp_path / "s", insecure=True).authentication_enabled
    with pytest.raises(ValueError, match="policy_file"):
        SecuritySettings(policy_file=tmp_path / "p.yaml")
    with pytest.raises(ValueError, match="ca_file"):
        ServerTlsConfig(cert_file=tmp_path / "c", key_file=tmp_path / "k", client_auth=True)


def test_settings_from_env(tmp_path: Path) -> None:
    env = {
        "RPCMESH_TLS_CERT": "c.crt",
        "RPCMESH_TLS_KEY": "c.key",
        "RPCMESH_TLS_CA": "ca.crt",
        "RPCMESH_TLS_CLIENT_AUTH": "true",
        "RPCMESH_TOKEN_ISSUER": "me",
    }
    settings = SecuritySettings.from_env(env)
    assert settings.tls is not None and settings.tls.client_auth and settings.token_issuer == "me"
    assert SecuritySettings.from_env({}).tls is None
    with pytest.raises(ValueError, match="both or neither"):
        SecuritySettings.from_env({"RPCMESH_TLS_CERT": "c.crt"})


def test_server_security_warns_loudly_for_plaintext() -> None:
    security = ServerSecurity.build(SecuritySettings())
    assert security.credentials is None
    [warning] = security.warnings("127.0.0.1:1")
    assert "PLAINTEXT" in warning


def test_build_fails_on_unreadable_files(tmp_path: Path) -> None:
    settings = SecuritySettings(
        tls=ServerTlsConfig(cert_file=tmp_path / "no.crt", key_file=tmp_path / "no.key")
    )
    with pytest.raises(ValueError, match="cannot read"):
        ServerSecurity.build(settings)


def test_client_refuses_token_over_plaintext_unless_development_mode() -> None:
    with pytest.raises(ValueError, match="plaintext"):
        ClientSecurity(token="t")
    assert len(ClientSecurity(token="t", insecure=True).aio_interceptors()) == 4
    assert ClientSecurity(tls=ClientTlsConfig(), token="t").aio_interceptors() == []
    with pytest.raises(ValueError, match="plaintext"):
        ClientSecurity.from_env({"RPCMESH_TOKEN": "t"})
    assert ClientSecurity.from_env({"RPCMESH_TOKEN": "t", "RPCMESH_TLS_CA": "ca.crt"}).tls is not None


def test_certificates_have_sans_usages_and_validity(tmp_path: Path) -> None:
    written = write_development_set(tmp_path, server_names=["mesh.internal"], clients=["order-service"])
    server = x509.load_pem_x509_certificate(written.server_cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert {"localhost", "mesh.internal"} <= set(sans.get_values_for_type(x509.DNSName))
    cert_path, key_path = written.clients["order-service"]
    client = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert client.subject.rfc4514_string() == "CN=order-service"
    assert key_path.stat().st_mode & 0o777 == 0o600
    # A second run reuses the CA, so earlier certificates stay valid.
    again = write_development_set(tmp_path, clients=["billing"])
    assert again.ca_cert.read_bytes() == written.ca_cert.read_bytes()


def test_expired_certificate_window() -> None:
    ca = create_ca()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    issued = issue_certificate(ca, "old", client=True, not_before=past, validity=datetime.timedelta(days=1))
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    assert cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC)
    with pytest.raises(ValueError, match="server or client"):
        issue_certificate(ca, "x", server=False, client=False)
