"""Fault tests with real processes: kill -9 the Registry, SIGSTOP a service."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from tests.integration.registry.helpers import eventually, register, resolve_ids
from tests.support.processes import ManagedProcess, python_env, start_control_plane

pytestmark = [pytest.mark.fault, pytest.mark.slow]

HERE = Path(__file__).resolve().parent


async def _register_until_cut(address: str, service: str, acked: list[str], counter: list[int]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        while True:
            counter[0] += 1
            try:
                reg = await register(
                    stub, service=service, port=1 + counter[0] % 65000, ttl_seconds=3600, deadline=2
                )
            except grpc.aio.AioRpcError:
                return  # the registry died under us: this one was never acknowledged
            acked.append(reg.instance_id)


async def test_kill_9_twenty_times_loses_no_acknowledged_registration(tmp_path: Path) -> None:
    data = tmp_path / "data"
    acked: list[str] = []
    counter = [0]
    rng = random.Random(7)
    for _ in range(20):
        proc, address = start_control_plane(data)
        try:
            writers = [
                asyncio.create_task(_register_until_cut(address, "crash", acked, counter)) for _ in range(4)
            ]
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            proc.kill()  # kill -9 mid-write
            await asyncio.wait_for(asyncio.gather(*writers), 30)
        finally:
            proc.kill()
    assert len(acked) > 20
    proc, address = start_control_plane(data)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            present = await resolve_ids(stub, "crash")
        missing = set(acked) - present
        assert not missing, f"{len(missing)} acknowledged registrations lost of {len(acked)}"
    finally:
        proc.kill()


async def test_stopped_service_leaves_resolve_and_its_keepalive_is_refused_after(
    control_plane: tuple[ManagedProcess, str],
) -> None:
    _, address = control_plane
    ttl, probe_interval = 2.0, 0.5
    holder = ManagedProcess(
        [sys.executable, str(HERE / "lease_holder.py"), address, str(ttl), str(probe_interval)],
        env=python_env(),
    )
    try:
        instance_id = holder.wait_for_line(r"registered (\S+)").group(1)
        holder.wait_for_line(r"keepalive code=0")
        async with grpc.aio.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            assert await resolve_ids(stub, "holder") == {instance_id}
            watch = stub.Watch(registry_pb2.WatchRequest(service="holder"))
            assert (await watch.read()).snapshot
            holder.signal(signal.SIGSTOP)
            stopped_at = time.monotonic()

            async def gone() -> bool:
                return instance_id not in await resolve_ids(stub, "holder")

            await eventually(gone, limit=30)
            left_after = time.monotonic() - stopped_at
            # TTL + one probe interval, plus a generous margin for a loaded shared machine.
            assert left_after <= ttl + probe_interval + 3.0, left_after
            delete = None
            while delete is None:
                response = await asyncio.wait_for(watch.read(), 15)
                delete = next(
                    (e for e in response.events if e.type == registry_pb2.WATCH_EVENT_TYPE_DELETE), None
                )
            assert delete.instance.instance_id == instance_id and delete.reason == "expired"
            watch.cancel()
            holder.signal(signal.SIGCONT)
            holder.wait_for_line(rf"keepalive code={grpc.StatusCode.NOT_FOUND.value[0]}", timeout=20)
    finally:
        holder.signal(signal.SIGCONT)
        holder.kill()
