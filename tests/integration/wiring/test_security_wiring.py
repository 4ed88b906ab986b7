"""Security wired end to end: `rpcmesh up`, echo ServiceHosts and a Mesh client, all with TLS.

Three modes against real processes: TLS with bearer tokens, mTLS with client
certificates, and the gateway with TLS. In each, calls through the mesh work; a
caller without credentials is refused (UNAUTHENTICATED, or the handshake fails); a
certificate from a foreign CA fails the handshake; and a ServiceHost registers
only under its own identity (another identity cannot register its service).
"""

from __future__ import annotations

import asyncio
import subprocess

import grpc
import grpc.aio
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from rpcmesh.client import Mesh, SyncMesh
from rpcmesh.host import LeaseKeeper
from rpcmesh.security.client import ClientSecurity, aio_channel
from rpcmesh.security.tls import ClientTlsConfig
from tests.integration.security.conftest import coordinator_args
from tests.integration.wiring.conftest import Pki, Processes
from tests.support.processes import ROOT, python_env, rpcmesh_command

pytestmark = pytest.mark.slow

TIMEOUT = 10.0


def _plane_args(pki: Pki, *, mtls: bool) -> list[str]:
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-ca", str(pki.ca)]
    args += ["--policy", str(pki.policy)]
    if mtls:
        return [*args, "--tls-client-auth", *coordinator_args(pki.folder)]
    return [*args, "--token-secret-file", str(pki.secret_file)]


def _host_env(pki: Pki, identity: str, *, mtls: bool) -> dict[str, str]:
    env = {
        "RPCMESH_TLS_CERT": str(pki.server_cert),
        "RPCMESH_TLS_KEY": str(pki.server_key),
        "RPCMESH_TLS_CA": str(pki.ca),
    }
    if mtls:
        cert, key = pki.client_cert(identity)
        env |= {
            "RPCMESH_TLS_CLIENT_AUTH": "1",
            "RPCMESH_TLS_CLIENT_CERT": str(cert),
            "RPCMESH_TLS_CLIENT_KEY": str(key),
        }
    else:
        env |= {"RPCMESH_TOKEN_SECRET_FILE": str(pki.secret_file), "RPCMESH_TOKEN": pki.token(identity)}
    return env


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        rpcmesh_command(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


async def _echo_code(address: str, security: ClientSecurity) -> grpc.StatusCode:
    async with aio_channel(address, security) as channel:
        try:
            await echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(message="x"), timeout=TIMEOUT)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def _resolve(address: str, security: ClientSecurity) -> tuple[grpc.StatusCode, list[str]]:
    async with aio_channel(address, security) as channel:
        try:
            reply = await registry_pb2_grpc.RegistryStub(channel).Resolve(
                registry_pb2.ResolveRequest(service="echo"), timeout=TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            return error.code(), []
    return grpc.StatusCode.OK, [instance.instance_id for instance in reply.instances]


async def _call_through_mesh(registry: str, security: ClientSecurity) -> tuple[str, str]:
    """One Echo call through a Mesh; returns (answering instance, its address)."""
    async with Mesh(registry, security=security) as mesh:
        (view,) = await mesh.wait_for_instances("echo", 1, within=20)
        reply = await echo_pb2_grpc.EchoStub(mesh.channel("echo")).Echo(
            echo_pb2.EchoRequest(message="hello"), timeout=TIMEOUT
        )
        assert reply.message == "hello"
        return reply.instance_id, view.address


async def _intruder_registers(registry: str, security: ClientSecurity) -> bool:
    """Whether an identity other than ``echo`` manages to register an instance of ``echo``."""
    instance = registry_pb2.Instance(service="echo", instance_id="impostor", address="127.0.0.1:1")
    keeper = LeaseKeeper(instance, ttl=10.0, registries=[registry], security=security)
    try:
        return await keeper.start(wait=3.0)
    finally:
        await keeper.stop(deregister=False)


async def test_tls_with_tokens(pki: Pki, processes: Processes) -> None:
    registry = processes.control_plane(*_plane_args(pki, mtls=False))
    processes.echo(registry, "echo-1", _host_env(pki, "echo", mtls=False))

    instance_id, host = await _call_through_mesh(registry, pki.token_client("client"))
    assert instance_id == "echo-1"
    # Registered under the echo identity, visible to an authenticated reader.
    assert await _resolve(registry, pki.token_client("client")) == (grpc.StatusCode.OK, ["echo-1"])

    # No token: the host and the control plane refuse the caller.
    assert await _echo_code(host, pki.token_client(None)) == grpc.StatusCode.UNAUTHENTICATED
    assert (await _resolve(registry, pki.token_client(None)))[0] == grpc.StatusCode.UNAUTHENTICATED
    # A token signed with another secret is no better.
    from rpcmesh.security.tokens import mint_token

    forged = mint_token(b"another-secret-0123456789abcdef-xx", subject="client", issuer="rpcmesh", ttl=60)
    forged_client = ClientSecurity(tls=pki.tls_client(), token=forged)
    assert await _echo_code(host, forged_client) == grpc.StatusCode.UNAUTHENTICATED
    # A client trusting a foreign CA does not accept the servers' certificate: the handshake fails.
    foreign = ClientSecurity(tls=pki.tls_client(ca=pki.folder / "foreign-ca.crt"), token=pki.token("client"))
    assert await _echo_code(host, foreign) == grpc.StatusCode.UNAVAILABLE
    assert (await _resolve(registry, foreign))[0] == grpc.StatusCode.UNAVAILABLE
    # Plaintext to a TLS port fails too.
    async with grpc.aio.insecure_channel(host) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(message="x"), timeout=TIMEOUT)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    # Another identity cannot register the echo service; nothing changes.
    assert not await _intruder_registers(registry, pki.token_client("intruder"))
    assert await _resolve(registry, pki.token_client("ops")) == (grpc.StatusCode.OK, ["echo-1"])

    # The sync mesh and the CLI client commands take the same settings.
    def sync_call() -> str:
        with SyncMesh(registry, security=pki.token_client("client")) as mesh:
            mesh.wait_for_instances("echo", 1, within=20)
            stub = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
            return stub.Echo(echo_pb2.EchoRequest(message="sync"), timeout=TIMEOUT).message

    assert await asyncio.to_thread(sync_call) == "sync"
    cli_env = python_env({"RPCMESH_TLS_CA": str(pki.ca), "RPCMESH_TOKEN": pki.token("client")})
    listed = await asyncio.to_thread(_cli, ["services", "echo", "--target", registry], cli_env)
    assert listed.returncode == 0, listed.stderr
    assert "echo-1" in listed.stdout
    del cli_env["RPCMESH_TOKEN"]
    refused = await asyncio.to_thread(_cli, ["services", "--target", registry], cli_env)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


async def test_mtls_with_client_certificates(pki: Pki, processes: Processes) -> None:
    registry = processes.control_plane(*_plane_args(pki, mtls=True))
    processes.echo(registry, "echo-1", _host_env(pki, "echo", mtls=True))

    instance_id, host = await _call_through_mesh(registry, pki.mtls_client("client"))
    assert instance_id == "echo-1"
    assert await _resolve(registry, pki.mtls_client("ops")) == (grpc.StatusCode.OK, ["echo-1"])

    # No client certificate, or one from a foreign CA: the handshake fails.
    no_cert = ClientSecurity(tls=pki.tls_client())
    cert, key = pki.client_cert("foreign")
    foreign = ClientSecurity(tls=ClientTlsConfig(ca_file=pki.ca, cert_file=cert, key_file=key))
    for security in (no_cert, foreign):
        assert await _echo_code(host, security) == grpc.StatusCode.UNAVAILABLE
        assert (await _resolve(registry, security))[0] == grpc.StatusCode.UNAVAILABLE

    # The certificate's name is the identity: "intruder" cannot register echo.
    assert not await _intruder_registers(registry, pki.mtls_client("intruder"))
    assert await _resolve(registry, pki.mtls_client("ops")) == (grpc.StatusCode.OK, ["echo-1"])


async def test_gateway_with_tls(pki: Pki, processes: Processes) -> None:
    registry = processes.control_plane(*_plane_args(pki, mtls=False))
    processes.echo(registry, "echo-1", _host_env(pki, "echo", mtls=False))
    gateway_env = {"RPCMESH_TLS_CA": str(pki.ca), "RPCMESH_TOKEN": pki.token("gateway")}
    # With authentication on, the gateway forwards only what an access policy grants.
    access = pki.folder / "gateway-access.yaml"
    access.write_text("identities:\n  client:\n    calls: [echo]\n")
    gateway = processes.gateway(
        registry,
        gateway_env,
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--token-secret-file",
        str(pki.secret_file),
        "--access-policy",
        str(access),
    )

    async with aio_channel(gateway, pki.token_client("client")) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Echo(
            echo_pb2.EchoRequest(message="via gateway"), timeout=TIMEOUT
        )
    assert (reply.message, reply.instance_id) == ("via gateway", "echo-1")
    assert await _echo_code(gateway, pki.token_client(None)) == grpc.StatusCode.UNAUTHENTICATED
    foreign = ClientSecurity(tls=pki.tls_client(ca=pki.folder / "foreign-ca.crt"), token=pki.token("client"))
    assert await _echo_code(gateway, foreign) == grpc.StatusCode.UNAVAILABLE
