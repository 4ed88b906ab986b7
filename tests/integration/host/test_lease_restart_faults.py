"""LeaseKeeper against a control plane restarted (kill -9 or SIGTERM) at random moments of its renewal period.

A restart on the same port and data dir grants every stored lease its full TTL again; the
instance outlives that TTL only if the keeper renewed on the new process. So each trial
restarts the plane at a random offset in the keeper's renewal period and checks that the
instance is still resolvable once the restored TTL has run out. A :class:`Mesh` watches the
service throughout: it keeps the instance, and after the last restart it still sees changes.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path

import grpc.aio
import pytest
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from rpcmesh.client import Mesh
from rpcmesh.host import LeaseKeeper
from tests.support.processes import ManagedProcess, start_control_plane

SEED = int(os.environ.get("RPCMESH_FAULT_SEED", "20261204"))
TRIALS = 20
TTL = 1.2
RENEWAL_PERIOD = TTL / 3


async def instance_ids(registry: str, service: str) -> list[str]:
    # A subchannel of our own: one shared with the keeper's channel would carry its reconnect backoff.
    async with grpc.aio.insecure_channel(
        registry, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        request = registry_pb2.ResolveRequest(service=service)
        response = await stub.Resolve(request, timeout=5, wait_for_ready=True)
        return [instance.instance_id for instance in response.instances]


async def stop_plane(plane: ManagedProcess, how: signal.Signals) -> None:
    if how is signal.SIGKILL:
        plane.kill()
        return
    code = await asyncio.to_thread(plane.terminate, 15)
    assert code == 0, f"the control plane exited {code} on SIGTERM:\n{plane.output()[-2000:]}"


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_the_lease_outlives_control_plane_restarts_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    data_dir = tmp_path / "plane"
    plane, registry = start_control_plane(data_dir)
    port = int(registry.rsplit(":", 1)[1])
    keeper, late = (
        LeaseKeeper(
            registry_pb2.Instance(service="leased", instance_id=name, address=f"127.0.0.1:{n}"),
            ttl=TTL,
            registries=[registry],
            rpc_timeout=1.0,
        )
        for n, name in ((1, "k1"), (2, "k2"))
    )
    mesh = Mesh(registry)
    loop = asyncio.get_running_loop()
    try:
        assert await keeper.start(wait=10)
        await mesh.wait_for_instances("leased", 1)
        for trial in range(TRIALS):
            how = signal.SIGKILL if trial % 2 == 0 else signal.SIGTERM
            # The keeper renews every RENEWAL_PERIOD from a phase we do not observe: a uniform
            # offset from an arbitrary point lands uniformly across its renewal period.
            offset = rng.uniform(0, RENEWAL_PERIOD)
            down_for = rng.uniform(0, 0.2)
            about = (
                f"seed={SEED} trial={trial} signal={how.name} offset={offset:.3f}s down_for={down_for:.3f}s"
            )
            await asyncio.sleep(offset)
            await stop_plane(plane, how)
            await asyncio.sleep(down_for)
            plane, _ = await asyncio.to_thread(start_control_plane, data_dir, port=port)
            restarted = loop.time()
            assert await instance_ids(registry, "leased") == ["k1"], f"gone at restart: {about}"
            # The restart restored the lease with a TTL counted from before `restarted`: past this
            # point only a renewal on the new process keeps the instance.
            await asyncio.sleep(restarted + TTL + 0.3 - loop.time())
            assert await instance_ids(registry, "leased") == ["k1"], f"lease not renewed: {about}"
            assert keeper.registered, about
            assert [view.instance_id for view in mesh.endpoints("leased")] == ["k1"], about
        # The mesh's watch is connected to the last plane: it sees an instance registered now.
        assert await late.start(wait=10)
        await mesh.wait_for_instances("leased", 2, within=10)
    finally:
        try:
            await mesh.close()
            await late.stop(deregister=False)
            await keeper.stop(deregister=False)
        finally:
            plane.kill()
