"""`rpcmesh certs`, `rpcmesh token` and `rpcmesh up` configured by environment variables."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from rpcmesh.security.client import ClientSecurity, sync_channel
from tests.support.processes import python_env, rpcmesh_command, start_control_plane


def test_certs_token_and_tls_up_from_environment(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run(
        rpcmesh_command("certs", str(certs), "--client", "order-service", "--token-secret"),
        check=True,
        env=python_env(),
        capture_output=True,
    )
    token = subprocess.run(
        rpcmesh_command(
            "token", "order-service", "--secret-file", str(certs / "token.secret"), "--ttl", "60"
        ),
        check=True,
        env=python_env(),
        capture_output=True,
        text=True,
    ).stdout.strip()
    env = {
        "RPCMESH_TLS_CERT": str(certs / "server.crt"),
        "RPCMESH_TLS_KEY": str(certs / "server.key"),
        "RPCMESH_TLS_CA": str(certs / "ca.crt"),
        "RPCMESH_TOKEN_SECRET_FILE": str(certs / "token.secret"),
    }
    proc, address = start_control_plane(tmp_path / "data", env=env)
    try:
        assert "PLAINTEXT" not in proc.output()
        client_env = {"RPCMESH_TLS_CA": str(certs / "ca.crt"), "RPCMESH_TOKEN": token}
        channel = sync_channel(address, ClientSecurity.from_env(client_env))
        try:
            stub = registry_pb2_grpc.RegistryStub(channel)
            stub.Resolve(registry_pb2.ResolveRequest(service="order-service"), timeout=10)
            anonymous = sync_channel(
                address, ClientSecurity.from_env({"RPCMESH_TLS_CA": str(certs / "ca.crt")})
            )
            try:
                registry_pb2_grpc.RegistryStub(anonymous).Resolve(
                    registry_pb2.ResolveRequest(service="a"), timeout=10
                )
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            else:
                raise AssertionError("an anonymous call was accepted")
            finally:
                anonymous.close()
        finally:
            channel.close()
    finally:
        proc.kill()


def test_plaintext_is_announced_loudly_and_tokens_need_development_mode(tmp_path: Path) -> None:
    proc, address = start_control_plane(tmp_path / "data")
    try:
        proc.wait_for_line("WARNING: rpcmesh is serving PLAINTEXT")
        channel = sync_channel(address)
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            channel.close()
    finally:
        proc.kill()
    secret = tmp_path / "secret"
    secret.write_text("x" * 40)
    refused = subprocess.run(
        rpcmesh_command(
            "up", "--port", "0", "--data-dir", str(tmp_path / "d2"), "--token-secret-file", str(secret)
        ),
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "plaintext" in refused.stderr
    proc, address = start_control_plane(tmp_path / "d3", "--token-secret-file", str(secret), "--insecure")
    try:
        proc.wait_for_line("development mode")
    finally:
        proc.kill()
