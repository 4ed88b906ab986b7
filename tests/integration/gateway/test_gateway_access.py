"""Gateway authorization per identity and resolved target, against real processes.

A control plane, two Echo services (``echo-a``, ``echo-b``) and `rpcmesh gateway`
processes that authenticate callers by bearer token or client certificate.
Identity ``svc-a`` may call ``echo-a`` only; ``ops`` is an admin. Refused calls
carry a behaviour that would fail with FAILED_PRECONDITION on a backend, so a
PERMISSION_DENIED shows the call never reached one.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc

from rpcmesh.security.certs import create_ca, issue_certificate
from rpcmesh.security.tokens import mint_token
from tests.support.processes import ManagedProcess, start_echo, start_gateway

SECRET = b"gateway-access-test-secret-0123456789abcdef"
POLICY = """\
admins: [ops]
identities:
  svc-a:
    calls: [echo-a]
  svc-b: {}
"""
WOULD_FAIL = echo_pb2.Behaviour(fail_code=grpc.StatusCode.FAILED_PRECONDITION.value[0])


@dataclass
class Mesh:
    registry: str
    tmp: Path
    secret_file: Path
    policy_file: Path
    started: list[ManagedProcess]

    def gateway(self, *args: str) -> str:
        proc, address = start_gateway(self.registry, "--token-secret-file", str(self.secret_file), *args)
        self.started.append(proc)
        return address


def token(identity: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(SECRET, subject=identity, issuer='rpcmesh', ttl=600)}"),)


@pytest.fixture
def mesh(control_plane: tuple[ManagedProcess, str], tmp_path: Path) -> Iterator[Mesh]:
    _, registry = control_plane
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    policy_file = tmp_path / "access.yaml"
    policy_file.write_text(POLICY)
    started: list[ManagedProcess] = []
    try:
        started.append(start_echo(registry, "a-1", name="echo-a"))
        started.append(start_echo(registry, "b-1", name="echo-b"))
        yield Mesh(registry, tmp_path, secret_file, policy_file, started)
    finally:
        for proc in started:
            proc.kill()


async def echo(
    stub: echo_pb2_grpc.EchoStub, identity: str | None, target: str | None, *, would_fail: bool = False
) -> tuple[grpc.StatusCode, str]:
    """Call Echo through the gateway: (OK, instance id) or (status, details)."""
    metadata = token(identity) if identity else ()
    if target is not None:
        metadata = (*metadata, ("x-rpcmesh-service", target))
    request = echo_pb2.EchoRequest(message="hi", behaviour=WOULD_FAIL if would_fail else None)
    try:
        reply = await stub.Echo(request, metadata=metadata, timeout=15)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, reply.instance_id


async def test_identity_may_call_its_targets_only_through_both_routing_ways(mesh: Mesh) -> None:
    by_header = mesh.gateway("--insecure", "--access-policy", str(mesh.policy_file))
    by_route = mesh.gateway(
        "--insecure", "--access-policy", str(mesh.policy_file), "--route", "echo.v1.Echo=echo-b"
    )
    async with (
        grpc.aio.insecure_channel(by_header) as header_channel,
        grpc.aio.insecure_channel(by_route) as route_channel,
    ):
        header, route = echo_pb2_grpc.EchoStub(header_channel), echo_pb2_grpc.EchoStub(route_channel)
        assert await echo(header, "svc-a", "echo-a") == (grpc.StatusCode.OK, "a-1")
        code, details = await echo(header, "svc-a", "echo-b", would_fail=True)
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
        assert "'svc-a'" in details and "echo-b/Echo" in details
        # The convention target ("echo"), an unregistered one: refused before any discovery.
        assert (await echo(header, "svc-a", None, would_fail=True))[0] == grpc.StatusCode.PERMISSION_DENIED
        code, details = await echo(header, "svc-a", "echo-zzz")
        assert code == grpc.StatusCode.PERMISSION_DENIED and "echo-zzz/Echo" in details
        # Calls default to the identity's own service; an unlisted identity may call nothing.
        assert (await echo(header, "svc-b", "echo-a", would_fail=True))[
            0
        ] == grpc.StatusCode.PERMISSION_DENIED
        code, details = await echo(header, "stranger", "echo-a", would_fail=True)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "not in the policy" in details
        assert (await echo(header, None, "echo-a"))[0] == grpc.StatusCode.UNAUTHENTICATED
        # A streaming method of an allowed service passes too.
        stream = header.Expand(
            echo_pb2.ExpandRequest(message="x", repeat=2),
            metadata=(*token("svc-a"), ("x-rpcmesh-service", "echo-a")),
        )
        assert [r.message async for r in stream] == ["x", "x"]

        # The route table picks echo-b whatever the header says.
        code, details = await echo(route, "svc-a", "echo-a", would_fail=True)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "echo-b/Echo" in details
        assert await echo(route, "ops", None) == (grpc.StatusCode.OK, "b-1")
        for target in ("echo-a", "echo-b"):
            assert await echo(header, "ops", target) == (grpc.StatusCode.OK, target[-1] + "-1")

        # Seeded trials: concurrent calls of random identities, targets and routing ways.
        identities = ["svc-a", "svc-b", "ops", "stranger"]
        for seed in range(3):
            rng = random.Random(seed)
            plan = [
                (rng.choice(identities), rng.choice(["echo-a", "echo-b", None]), rng.random() < 0.5)
                for _ in range(16)
            ]

            def expected(identity: str, target: str | None, routed: bool) -> grpc.StatusCode:
                resolved = "echo-b" if routed else (target or "echo")
                allowed = identity == "ops" or (identity == "svc-a" and resolved == "echo-a")
                if not allowed:
                    return grpc.StatusCode.PERMISSION_DENIED
                if resolved == "echo":
                    return grpc.StatusCode.UNAVAILABLE  # allowed, but nothing is registered as "echo"
                return grpc.StatusCode.FAILED_PRECONDITION  # it reached the backend, which failed it

            outcomes = await asyncio.gather(
                *(
                    echo(route if routed else header, identity, target, would_fail=True)
                    for identity, target, routed in plan
                )
            )
            for (identity, target, routed), (code, details) in zip(plan, outcomes, strict=True):
                assert code == expected(identity, target, routed), (
                    f"seed={seed} identity={identity} target={target} routed={routed}: {code} {details}"
                )


async def test_without_policy_every_call_is_refused_unless_any_identity_is_allowed(mesh: Mesh) -> None:
    refusing = mesh.gateway("--insecure")
    open_gateway = mesh.gateway("--insecure", "--allow-any-identity")
    async with (
        grpc.aio.insecure_channel(refusing) as refusing_channel,
        grpc.aio.insecure_channel(open_gateway) as open_channel,
    ):
        refused, opened = echo_pb2_grpc.EchoStub(refusing_channel), echo_pb2_grpc.EchoStub(open_channel)
        for identity in ("ops", "svc-a"):
            code, details = await echo(refused, identity, "echo-a", would_fail=True)
            assert code == grpc.StatusCode.PERMISSION_DENIED, details
            assert f"'{identity}'" in details and "echo-a/Echo" in details and "--access-policy" in details
        assert await echo(opened, "svc-a", "echo-b") == (grpc.StatusCode.OK, "b-1")


async def test_client_certificate_identity_is_authorized_by_target(mesh: Mesh) -> None:
    ca = create_ca()
    ca_cert, _ = ca.write(mesh.tmp, "ca")
    server_cert, server_key = issue_certificate(ca, "localhost", names=["127.0.0.1"]).write(mesh.tmp, "gw")
    client_cert, client_key = issue_certificate(ca, "svc-a", server=False, client=True).write(mesh.tmp, "a")
    proc, address = start_gateway(
        mesh.registry,
        "--tls-cert", str(server_cert), "--tls-key", str(server_key), "--tls-ca", str(ca_cert),
        "--tls-client-auth", "--access-policy", str(mesh.policy_file),
    )  # fmt: skip
    mesh.started.append(proc)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_cert.read_bytes(),
        private_key=client_key.read_bytes(),
        certificate_chain=client_cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(address, credentials) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        assert await echo(stub, None, "echo-a") == (grpc.StatusCode.OK, "a-1")
        code, details = await echo(stub, None, "echo-b", would_fail=True)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "'svc-a'" in details
