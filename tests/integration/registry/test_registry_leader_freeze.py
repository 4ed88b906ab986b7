"""The PostgreSQL Registry's expiry leader frozen by SIGSTOP: another node takes over lease expiry.

Two `rpcmesh up` nodes share one fresh database. Each trial registers leases that
are renewed (each renewal through a random node that is not frozen) and leases that are not, then
freezes the current expiry leader at a random moment relative to their
deadlines. The other node must expire the unrenewed leases within TTL + 6 s of
the freeze and keep every renewed one; when the frozen node wakes it must not
expire a renewed lease either, and its own view must converge.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from pathlib import Path

import grpc.aio
import pytest
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from tests.integration.registry.helpers import expiry_leader, register, resolve_ids
from tests.support.processes import ManagedProcess, start_control_plane

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.backend]

TTL = 2.0
TRIALS = 3
SEED = 20261204


async def test_frozen_expiry_leader_another_node_expires_and_renewed_leases_stay(
    postgres_url: str, tmp_path: Path
) -> None:
    nodes: list[ManagedProcess] = []
    addresses: dict[int, str] = {}
    frozen: ManagedProcess | None = None
    try:
        for name in ("a", "b"):
            node, address = start_control_plane(tmp_path / name, "--store", postgres_url)
            nodes.append(node)
            addresses[node.pid] = address
            if name == "a":  # the first node leads; only then does the second one start
                await expiry_leader(postgres_url, nodes, first_trial=True)
        channels = {pid: grpc.aio.insecure_channel(address) for pid, address in addresses.items()}
        stubs = {pid: registry_pb2_grpc.RegistryStub(channel) for pid, channel in channels.items()}
        paused: set[int] = set()  # the pid of the frozen node: renewals go through the others
        try:
            for trial in range(TRIALS):
                seed = SEED + trial
                rng = random.Random(seed)
                leader = await expiry_leader(postgres_url, nodes, first_trial=trial == 0)
                other = next(node for node in nodes if node is not leader)
                survivor = stubs[other.pid]
                service = f"frozen{trial}"
                through = list(stubs.values())
                registered = [
                    await register(rng.choice(through), service=service, port=7000 + i, ttl_seconds=TTL)
                    for i in range(6)
                ]
                kept = registered[:3]  # the other three are never renewed
                kept_ids = {r.instance_id for r in kept}
                freeze_after = rng.uniform(0.0, TTL)
                where = f"seed={seed} trial={trial} freeze_after={freeze_after:.2f}s"

                renew_rng = random.Random(seed * 7919)

                async def renew(
                    kept: list[registry_pb2.RegisterResponse] = kept, renew_rng: random.Random = renew_rng
                ) -> None:
                    """Renew every kept lease through a random node that is not frozen."""
                    while True:
                        for r in kept:
                            request = registry_pb2.HeartbeatRequest(
                                lease_id=r.lease_id, lease_token=r.lease_token
                            )
                            while True:
                                live = [pid for pid in stubs if pid not in paused]
                                try:
                                    await stubs[renew_rng.choice(live)].Heartbeat(request, timeout=0.5)
                                    break
                                except grpc.aio.AioRpcError as exc:  # sent just as that node froze
                                    if exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                                        raise
                        await asyncio.sleep(0.3)

                renewer = asyncio.create_task(renew())
                try:
                    await asyncio.sleep(freeze_after)
                    frozen = leader
                    paused.add(leader.pid)
                    leader.signal(signal.SIGSTOP)
                    stopped_at = time.monotonic()
                    while True:
                        present = await resolve_ids(survivor, service)
                        assert kept_ids <= present, f"a renewed lease expired ({where})"
                        if present == kept_ids:
                            break
                        elapsed = time.monotonic() - stopped_at
                        assert elapsed <= TTL + 6, (
                            f"unrenewed leases still resolve {elapsed:.1f}s after the leader froze ({where})"
                        )
                        assert not renewer.done(), f"renewals failed: {renewer.exception()!r} ({where})"
                        await asyncio.sleep(0.1)
                    leader.signal(signal.SIGCONT)
                    frozen = None
                    paused.discard(leader.pid)
                    # The woken node must not expire a renewed lease, and its view must converge.
                    woke_at = time.monotonic()
                    while (
                        time.monotonic() - woke_at < 2.5
                        or await resolve_ids(stubs[leader.pid], service) != kept_ids
                    ):
                        assert time.monotonic() - woke_at < 20, (
                            f"the woken node's view did not converge ({where})"
                        )
                        assert await resolve_ids(survivor, service) == kept_ids, f"after wake-up ({where})"
                        assert not renewer.done(), f"renewals failed: {renewer.exception()!r} ({where})"
                        await asyncio.sleep(0.2)
                finally:
                    renewer.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                        await renewer
                for r in kept:  # leave the next trial a clean slate
                    await survivor.Deregister(
                        registry_pb2.DeregisterRequest(
                            service=service, instance_id=r.instance_id, lease_token=r.lease_token
                        )
                    )
        finally:
            for channel in channels.values():
                await channel.close()
    finally:
        if frozen is not None:
            frozen.signal(signal.SIGCONT)
        for node in nodes:
            node.kill()
