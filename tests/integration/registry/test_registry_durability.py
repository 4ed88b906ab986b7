"""State survives restarts; two PostgreSQL nodes serve one view; old revisions are refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
import pytest
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from rpcmesh.controlplane import ControlPlane, ControlPlaneConfig
from rpcmesh.controlplane.registry import RegistryComponent, RegistrySettings
from tests.integration.registry.helpers import eventually, register, resolve_ids
from tests.support.processes import ManagedProcess, start_control_plane


async def test_registration_survives_restart_and_lease_is_extended(
    registry_backend: tuple[str, list[str]], tmp_path: Path
) -> None:
    _, extra = registry_backend
    data = tmp_path / "data"
    proc, address = start_control_plane(data, *extra)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            reg = await register(stub, ttl_seconds=3)
            before = (await stub.Resolve(registry_pb2.ResolveRequest(service="echo"))).revision
        proc.terminate()
        # Down for most of the TTL: on restart the lease gets its full TTL again.
        await asyncio.sleep(2.0)
        proc, address = start_control_plane(data, *extra)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            resolved = await stub.Resolve(registry_pb2.ResolveRequest(service="echo"))
            assert [i.instance_id for i in resolved.instances] == [reg.instance_id]
            assert resolved.revision == before
            beat = await stub.Heartbeat(
                registry_pb2.HeartbeatRequest(lease_id=reg.lease_id, lease_token=reg.lease_token)
            )
            assert beat.ttl.seconds == 3
            # The restored lease still expires when nobody renews it.
            await eventually(lambda: _gone(stub, reg.instance_id), limit=15)
    finally:
        proc.kill()


async def _gone(stub: registry_pb2_grpc.RegistryStub, instance_id: str) -> bool:
    return instance_id not in await resolve_ids(stub, "echo")


@pytest.mark.backend
async def test_two_postgres_nodes_serve_one_view(postgres_url: str, tmp_path: Path) -> None:
    nodes: list[ManagedProcess] = []
    try:
        for index in range(2):
            proc, _ = start_control_plane(tmp_path / f"data{index}", "--store", postgres_url)
            nodes.append(proc)
        addresses = [node.wait_for_address() for node in nodes]
        channels = [grpc.aio.insecure_channel(address) for address in addresses]
        a, b = (registry_pb2_grpc.RegistryStub(channel) for channel in channels)
        watches = [stub.Watch(registry_pb2.WatchRequest()) for stub in (a, b)]
        for watch in watches:
            assert (await watch.read()).snapshot
        # Writes through both nodes, concurrently.
        registered = await asyncio.gather(
            *(register(a if i % 2 else b, service="shared", port=5000 + i, ttl_seconds=4) for i in range(10))
        )
        ids = {r.instance_id for r in registered}
        # Each node learns of the other's writes from the event table (LISTEN/NOTIFY and polling).
        await eventually(lambda: _has(a, ids))
        await eventually(lambda: _has(b, ids))
        # Renew half of them through node b only, the rest through neither.
        kept, dropped = registered[:5], registered[5:]

        async def renew() -> None:
            while True:
                for r in kept:
                    await b.Heartbeat(
                        registry_pb2.HeartbeatRequest(lease_id=r.lease_id, lease_token=r.lease_token)
                    )
                await asyncio.sleep(0.3)

        renewer = asyncio.create_task(renew())
        try:
            for stub in (a, b):
                await eventually(lambda s=stub: _exactly(s, {r.instance_id for r in kept}), limit=15)  # type: ignore[misc]
        finally:
            renewer.cancel()
        # Both watchers saw the same events, in revision order, with one DELETE per expired lease.
        seen: list[list[registry_pb2.WatchEvent]] = [[], []]
        for index, watch in enumerate(watches):
            while len(seen[index]) < 15:
                seen[index].extend((await asyncio.wait_for(watch.read(), 10)).events)
            watch.cancel()
        assert [(e.revision, e.type) for e in seen[0]] == [(e.revision, e.type) for e in seen[1]]
        revisions = [e.revision for e in seen[0]]
        assert revisions == sorted(set(revisions))
        deletes = [e.instance.instance_id for e in seen[0] if e.type == registry_pb2.WATCH_EVENT_TYPE_DELETE]
        assert sorted(deletes) == sorted(r.instance_id for r in dropped)
        for channel in channels:
            await channel.close()
    finally:
        for node in nodes:
            node.kill()


async def _has(stub: registry_pb2_grpc.RegistryStub, ids: set[str]) -> bool:
    return await resolve_ids(stub, "shared") == ids


async def _exactly(stub: registry_pb2_grpc.RegistryStub, ids: set[str]) -> bool:
    return await resolve_ids(stub, "shared") == ids


async def test_resume_before_retained_window_is_out_of_range(tmp_path: Path) -> None:
    config = ControlPlaneConfig(port=0, data_dir=tmp_path)
    plane = ControlPlane(config, components=[RegistryComponent(config, RegistrySettings(retain_events=4))])
    address = await plane.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            for port in range(5001, 5011):
                await register(stub, port=port)
            watch = stub.Watch(registry_pb2.WatchRequest(after_revision=1))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await watch.read()
            assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert "after_revision" in (caught.value.details() or "")
            recent = stub.Watch(registry_pb2.WatchRequest(after_revision=8))
            response = await recent.read()
            assert [e.revision for e in response.events] == [9, 10]
            recent.cancel()
    finally:
        await plane.stop()
