"""A watch resuming on a PostgreSQL node that reads the log late is not told the registry lost its data.

Two real Registry nodes (in-process control planes) share one fresh database;
node B reaches PostgreSQL through a FreezableProxy, so freezing it leaves B's
view behind the database (a stalled connection: nothing is closed, nothing
answers). A client saw revision N+1 through node A and resumes its watch with
``after_revision=N+1`` on node B, whose view is still at N. Before the fix B
waited two poll intervals and answered OUT_OF_RANGE ("lost its data or is
another registry"), and the client took a snapshot from B's late view, losing
what B had not read. Now B asks the database: it has the revision, so B waits
(bounded) for its view to catch up and resumes the watch from N+1, or, while
it still cannot read the log, answers UNAVAILABLE, which the client retries.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import grpc.aio
import pytest
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from rpcmesh.controlplane import ControlPlane, ControlPlaneConfig
from rpcmesh.controlplane.registry import RegistryComponent, RegistrySettings
from tests.integration.registry.helpers import eventually, register, resolve_ids
from tests.support.tcp_proxy import FreezableProxy

pytestmark = [pytest.mark.backend, pytest.mark.fault]

SEED = 7309
TRIALS = 4
POLL = 0.2
CATCH_UP = 3.0
SERVICE = "late"


def _settings() -> RegistrySettings:
    return RegistrySettings(poll_interval=POLL, catch_up_timeout=CATCH_UP, probes_enabled=False)


async def _plane(url: str, data_dir: Path) -> tuple[ControlPlane, str]:
    config = ControlPlaneConfig(port=0, data_dir=data_dir, store=url)
    plane = ControlPlane(config, components=[RegistryComponent(config, _settings())])
    return plane, await plane.start()


def _through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the local relay's."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"))


@pytest.fixture
async def nodes(
    postgres_url: str, tmp_path: Path
) -> AsyncIterator[tuple[registry_pb2_grpc.RegistryStub, registry_pb2_grpc.RegistryStub, FreezableProxy]]:
    parts = urlsplit(postgres_url)
    assert parts.hostname is not None and parts.port is not None
    proxy = FreezableProxy(parts.hostname, parts.port)
    await proxy.start()
    planes: list[ControlPlane] = []
    channels: list[grpc.aio.Channel] = []
    try:
        # A starts first (and leads lease expiry); B reaches the database only through the relay.
        for url, name in ((postgres_url, "a"), (_through(postgres_url, proxy.port), "b")):
            plane, address = await _plane(url, tmp_path / name)
            planes.append(plane)
            channels.append(grpc.aio.insecure_channel(address))
        yield (
            registry_pb2_grpc.RegistryStub(channels[0]),
            registry_pb2_grpc.RegistryStub(channels[1]),
            proxy,
        )
    finally:
        proxy.thaw()
        for channel in channels:
            await channel.close()
        for plane in reversed(planes):
            await plane.stop()
        await proxy.close()


async def _first_events(
    call: grpc.aio.UnaryStreamCall[registry_pb2.WatchRequest, registry_pb2.WatchResponse],
) -> list[registry_pb2.WatchEvent]:
    response: registry_pb2.WatchResponse = await call.read()  # type: ignore[assignment]
    assert not response.snapshot
    return list(response.events)


async def test_resume_on_a_late_node_is_not_out_of_range(
    nodes: tuple[registry_pb2_grpc.RegistryStub, registry_pb2_grpc.RegistryStub, FreezableProxy],
) -> None:
    a, b, proxy = nodes
    for trial in range(TRIALS):
        seed = SEED + trial
        rng = random.Random(seed)
        # Even trials: B's store connection comes back while the watch waits; odd: only after B answered.
        thaw_after = rng.uniform(3 * POLL, CATCH_UP / 2) if trial % 2 == 0 else None
        for _ in range(rng.randint(1, 3)):
            await register(a, service=SERVICE, port=rng.randint(2000, 9000), ttl_seconds=600)
        expected = await resolve_ids(a, SERVICE)
        await eventually(partial(_sees, b, expected))
        proxy.freeze()
        seen = await register(a, service=SERVICE, port=rng.randint(2000, 9000), ttl_seconds=600)
        after = seen.revision  # the client saw this revision through A; B's view is behind it
        where = f"seed={seed} trial={trial} after_revision={after} thaw_after={thaw_after}"
        loop = asyncio.get_running_loop()
        timer = loop.call_later(thaw_after, proxy.thaw) if thaw_after is not None else None
        try:
            call = b.Watch(registry_pb2.WatchRequest(service=SERVICE, after_revision=after), timeout=30)
            if thaw_after is None:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call.read()
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, (
                    f"{refused.value.code().name}: {refused.value.details()} ({where})"
                )
                proxy.thaw()
                call = b.Watch(registry_pb2.WatchRequest(service=SERVICE, after_revision=after), timeout=30)
            following = await register(a, service=SERVICE, port=rng.randint(2000, 9000), ttl_seconds=600)
            try:
                events = await _first_events(call)
            except grpc.aio.AioRpcError as exc:
                raise AssertionError(
                    f"the resume on B failed: {exc.code().name}: {exc.details()} ({where})"
                ) from exc
            assert [(e.revision, e.instance.instance_id) for e in events] == [
                (following.revision, following.instance_id)
            ], where
            call.cancel()
        finally:
            if timer is not None:
                timer.cancel()
            proxy.thaw()


async def _sees(stub: registry_pb2_grpc.RegistryStub, expected: set[str]) -> bool:
    return await resolve_ids(stub, SERVICE) == expected
