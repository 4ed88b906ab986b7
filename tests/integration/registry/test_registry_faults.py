"""Fault tests with real processes: kill -9 the Registry, SIGSTOP a service."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import time
from pathlib import Path

import grpc
import grpc.aio
import psycopg
import pytest
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from tests.integration.registry.helpers import eventually, register, resolve_ids
from tests.support.processes import ManagedProcess, python_env, start_control_plane

pytestmark = [pytest.mark.fault, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
DELETE = registry_pb2.WATCH_EVENT_TYPE_DELETE


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


_LEADER_LOCK = 0x5245474C  # the expiry leader's advisory lock (postgres_store._LEADER_LOCK)


async def _leader_backend_pid(postgres_url: str) -> int | None:
    """The PostgreSQL backend pid of the session holding the expiry-leader lock, if any."""
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        row = await (
            await conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND ((classid::bigint << 32) | objid::bigint) = %s",
                (_LEADER_LOCK,),
            )
        ).fetchone()
    return int(row[0]) if row is not None else None


@pytest.mark.backend
async def test_expiry_leader_killed_the_other_node_takes_over(postgres_url: str, tmp_path: Path) -> None:
    nodes: list[ManagedProcess] = []
    try:
        leader, _ = start_control_plane(tmp_path / "leader", "--store", postgres_url)
        nodes.append(leader)
        leader.wait_for_address()
        # The first node takes the expiry lock; only then does the second one start.
        await eventually(lambda: _holds_lock(postgres_url), limit=20)
        first_pid = await _leader_backend_pid(postgres_url)
        survivor, address = start_control_plane(tmp_path / "survivor", "--store", postgres_url)
        nodes.append(survivor)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            watch = stub.Watch(registry_pb2.WatchRequest(service="led"))
            assert (await watch.read()).snapshot
            registered = [await register(stub, service="led", port=6000 + i, ttl_seconds=2) for i in range(6)]
            kept, dropped = registered[:3], registered[3:]

            async def renew() -> None:
                while True:
                    for r in kept:
                        await stub.Heartbeat(
                            registry_pb2.HeartbeatRequest(lease_id=r.lease_id, lease_token=r.lease_token)
                        )
                    await asyncio.sleep(0.3)

            renewer = asyncio.create_task(renew())
            try:
                leader.kill()  # kill -9: its session ends and the survivor takes the lock
                await eventually(lambda: _lock_moved(postgres_url, first_pid), limit=20)
                kept_ids = {r.instance_id for r in kept}
                await eventually(lambda: _resolves(stub, kept_ids), limit=20)
                seen = 0
                while seen < len(dropped):
                    response = await asyncio.wait_for(watch.read(), 15)
                    seen += sum(1 for e in response.events if e.type == DELETE)
                # Another TTL and more: renewed leases stay, and no lease expires twice.
                await asyncio.sleep(3.0)
                upto = (await stub.Resolve(registry_pb2.ResolveRequest(service="led"))).revision
                history = stub.Watch(
                    registry_pb2.WatchRequest(service="led", after_revision=registered[0].revision)
                )
                events: list[registry_pb2.WatchEvent] = []
                while not events or events[-1].revision < upto:
                    events.extend((await asyncio.wait_for(history.read(), 15)).events)
                history.cancel()
                assert await resolve_ids(stub, "led") == kept_ids
            finally:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
            watch.cancel()
        deletes = [e for e in events if e.type == DELETE]
        assert sorted(e.instance.instance_id for e in deletes) == sorted(r.instance_id for r in dropped)
        assert all(e.reason == "expired" for e in deletes)
    finally:
        for node in nodes:
            node.kill()


async def _holds_lock(postgres_url: str) -> bool:
    return await _leader_backend_pid(postgres_url) is not None


async def _lock_moved(postgres_url: str, first_pid: int | None) -> bool:
    pid = await _leader_backend_pid(postgres_url)
    return pid is not None and pid != first_pid


async def _resolves(stub: registry_pb2_grpc.RegistryStub, ids: set[str]) -> bool:
    return await resolve_ids(stub, "led") == ids
