"""Several PostgreSQL Registry nodes probe an instance from one place: the expiry leader.

Every node used to probe with a damper of its own, so two nodes could write
opposite HEALTH verdicts. Now only the expiry leader probes; when it dies
(kill -9 at a random moment relative to the probes) another node takes over
the probes and its verdicts reach every node.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from tests.integration.registry.helpers import expiry_leader, ttl
from tests.support.processes import ManagedProcess, start_control_plane

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.backend]

SEED = 6021
PROBE_INTERVAL = 0.2


class _CountingHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 that records which connection (peer address) each Check came from."""

    def __init__(self) -> None:
        super().__init__()
        self.checks: list[tuple[float, str]] = []

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        self.checks.append((time.monotonic(), context.peer()))
        return await super().Check(request, context)

    def probers_since(self, since: float, at_least: int = 3) -> set[str]:
        """Connections that sent at least ``at_least`` checks since ``since``."""
        counts = Counter(peer for at, peer in self.checks if at >= since)
        return {peer for peer, count in counts.items() if count >= at_least}


async def _health_of(stub: registry_pb2_grpc.RegistryStub, instance_id: str) -> int:
    response = await stub.Resolve(registry_pb2.ResolveRequest(service="probed", include_unhealthy=True))
    return next((i.health for i in response.instances if i.instance_id == instance_id), -1)


async def test_only_the_expiry_leader_probes_and_another_node_takes_over(
    postgres_url: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    servicer = _CountingHealth()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    nodes: list[ManagedProcess] = []
    try:
        first, _ = start_control_plane(tmp_path / "a", "--store", postgres_url)
        nodes.append(first)
        await expiry_leader(postgres_url, nodes, first_trial=True)
        second, address = start_control_plane(tmp_path / "b", "--store", postgres_url)
        nodes.append(second)
        leader = await expiry_leader(postgres_url, nodes, first_trial=True)
        follower = next(node for node in nodes if node is not leader)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            check = registry_pb2.GrpcHealthCheck(
                interval=ttl(PROBE_INTERVAL), timeout=ttl(PROBE_INTERVAL), failures_before_critical=1
            )
            reg = await stub.Register(
                registry_pb2.RegisterRequest(
                    instance=registry_pb2.Instance(
                        service="probed", address=f"127.0.0.1:{port}", health_check=check
                    ),
                    ttl=ttl(600),
                )
            )
            await asyncio.sleep(1.0)  # every node that probes has connected by now
            window = time.monotonic()
            await asyncio.sleep(2.5)
            probers = servicer.probers_since(window)
            assert len(probers) == 1, f"{len(probers)} nodes probe the instance: {sorted(probers)}"

            kill_after = rng.uniform(0.0, 1.0)
            await asyncio.sleep(kill_after)
            where = f"seed={SEED} kill_after={kill_after:.2f}s"
            leader.kill()
            killed_at = time.monotonic()
            # The survivor takes over the lock and the probes (a connection of its own)...
            deadline = time.monotonic() + 20
            while not (servicer.probers_since(killed_at + 0.5) - probers):
                assert time.monotonic() < deadline, f"no node took over the probes ({where})"
                await asyncio.sleep(0.1)
            assert await expiry_leader(postgres_url, nodes, first_trial=False) is follower, where
            # ...and its verdicts are written: the instance turns critical, then passing again.
            for status, health_state in (
                (health_pb2.HealthCheckResponse.NOT_SERVING, registry_pb2.HEALTH_STATE_CRITICAL),
                (health_pb2.HealthCheckResponse.SERVING, registry_pb2.HEALTH_STATE_PASSING),
            ):
                await servicer.set("", status)
                deadline = time.monotonic() + 10
                while await _health_of(stub, reg.instance_id) != health_state:
                    assert time.monotonic() < deadline, f"no verdict {health_state} after takeover ({where})"
                    await asyncio.sleep(0.1)
    finally:
        for node in nodes:
            node.kill()
        await server.stop(None)
