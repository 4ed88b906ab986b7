"""A Registry that lost its data: a running Mesh must follow the new registry, not its stale set.

The control plane is killed (kill -9) and started again on the same port with a
NEW data directory and a different set of instances. The Mesh's watch resumes
from a revision the new registry never reached; the registry answers
OUT_OF_RANGE and the Mesh takes a snapshot. Before, the resume was accepted and
every event was dropped until the new revision caught up, so the Mesh kept
routing to the old instances (which still serve, so nothing failed loudly).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest
from echo.servicer import EchoServicer
from echo.v1 import echo_pb2, echo_pb2_grpc
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from rpcmesh.client import Mesh, MeshPolicy, MethodPolicy, ServicePolicy
from tests.integration.registry.helpers import instance, ttl
from tests.support.processes import ManagedProcess, start_control_plane

pytestmark = [pytest.mark.fault, pytest.mark.slow]

SEED = 4151
RESTARTS = 3


async def _serve(name: str) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer(name), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _populate(address: str, chosen: dict[str, int], churn: int) -> None:
    """Register ``chosen`` (name -> port) as echo instances, then churn the echo revision up."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        # wait_for_ready: the process-wide subchannel to this address may still be backing off
        # from the mesh's reconnect attempts while the control plane was down.
        for name, port in chosen.items():
            await stub.Register(
                registry_pb2.RegisterRequest(instance=instance("echo", port, instance_id=name), ttl=ttl(600)),
                timeout=10,
                wait_for_ready=True,
            )
        for i in range(churn):  # a short-lived instance that nobody calls: only the revision moves
            reg = await stub.Register(
                registry_pb2.RegisterRequest(
                    instance=instance("echo", 1, instance_id=f"churn-{i}"), ttl=ttl(600)
                ),
                timeout=10,
                wait_for_ready=True,
            )
            await stub.Deregister(
                registry_pb2.DeregisterRequest(
                    service="echo", instance_id=reg.instance_id, lease_token=reg.lease_token
                ),
                timeout=10,
                wait_for_ready=True,
            )


async def _routes_only_to(stub: echo_pb2_grpc.EchoStub, expected: set[str], limit: float, where: str) -> None:
    deadline = time.monotonic() + limit
    seen: set[str] = set()
    while True:
        seen = set()
        for _ in range(12):
            with_timeout = await stub.Echo(echo_pb2.EchoRequest(message="who"), timeout=5)
            seen.add(with_timeout.instance_id)
        if seen == expected:
            return
        assert time.monotonic() < deadline, (
            f"the mesh routes to {sorted(seen)}, not {sorted(expected)} ({where})"
        )
        await asyncio.sleep(0.1)


async def test_mesh_follows_a_registry_restarted_without_its_data(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    servers: dict[str, tuple[grpc.aio.Server, int]] = {}
    for i in range(6):
        servers[f"echo-{i}"] = await _serve(f"echo-{i}")
    ports = {name: port for name, (_, port) in servers.items()}
    plane: ManagedProcess | None = None
    try:
        plane, address = start_control_plane(tmp_path / "data-0")
        port = int(address.rsplit(":", 1)[1])
        current = dict(rng.sample(sorted(ports.items()), 2))
        await _populate(address, current, churn=rng.randint(6, 20))
        policy = MeshPolicy(default=ServicePolicy(method=MethodPolicy(idempotent=True, timeout=5)))
        async with Mesh(address, policy=policy) as mesh:
            stub = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
            await _routes_only_to(stub, set(current), 20, f"seed={SEED} before any restart")
            for restart in range(1, RESTARTS + 1):
                kill_after = rng.uniform(0.0, 0.5)
                register_after = rng.uniform(0.0, 1.0)
                churn = rng.randint(6, 20)
                others = sorted((name, p) for name, p in ports.items() if name not in current)
                current = dict(rng.sample(others, rng.randint(1, 2)))
                where = (
                    f"seed={SEED} restart={restart} kill_after={kill_after:.2f}s "
                    f"register_after={register_after:.2f}s new={sorted(current)}"
                )
                await asyncio.sleep(kill_after)
                plane.kill()
                plane, _ = await asyncio.to_thread(
                    start_control_plane, tmp_path / f"data-{restart}", port=port
                )
                await asyncio.sleep(register_after)
                await _populate(address, current, churn=0)
                await _routes_only_to(stub, set(current), 20, where)
                # Raise the revision above what the next registry will reach before the mesh resumes.
                await _populate(address, {}, churn=churn)
    finally:
        if plane is not None:
            plane.kill()
        for server, _ in servers.values():
            await server.stop(None)
