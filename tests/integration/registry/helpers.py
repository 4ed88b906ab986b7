"""Small helpers for Registry tests: build requests, poll for conditions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import psycopg
from google.protobuf import duration_pb2
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from tests.support.processes import ManagedProcess

LEADER_LOCK = 0x5245474C  # postgres_store._LEADER_LOCK
LEADER_APP = "rpcmesh-registry-leader-"  # postgres_store.LEADER_APPLICATION_PREFIX


def instance(service: str = "echo", port: int = 5000, **fields: object) -> registry_pb2.Instance:
    return registry_pb2.Instance(service=service, address=f"127.0.0.1:{port}", **fields)  # type: ignore[arg-type]


def ttl(seconds: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))


async def register(
    stub: registry_pb2_grpc.RegistryStub,
    service: str = "echo",
    port: int = 5000,
    ttl_seconds: float = 30,
    deadline: float | None = None,
    **fields: object,
) -> registry_pb2.RegisterResponse:
    response: registry_pb2.RegisterResponse = await stub.Register(
        registry_pb2.RegisterRequest(instance=instance(service, port, **fields), ttl=ttl(ttl_seconds)),
        timeout=deadline,
    )
    return response


async def resolve_ids(stub: registry_pb2_grpc.RegistryStub, service: str, **filters: object) -> set[str]:
    response = await stub.Resolve(registry_pb2.ResolveRequest(service=service, **filters))  # type: ignore[arg-type]
    return {item.instance_id for item in response.instances}


async def eventually(
    condition: Callable[[], Awaitable[bool]], limit: float = 15.0, interval: float = 0.05
) -> float:
    """Poll until condition() is true; returns the seconds it took. Fails on timeout."""
    start = time.monotonic()
    while True:
        if await condition():
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            raise AssertionError(f"condition not met within {limit}s")
        await asyncio.sleep(interval)


async def lock_holder(postgres_url: str) -> tuple[int, str] | None:
    """(backend pid, application_name) of the session holding the expiry lock, if any."""
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        row = await (
            await conn.execute(
                "SELECT l.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "WHERE l.locktype = 'advisory' AND l.granted "
                "AND ((l.classid::bigint << 32) | l.objid::bigint) = %s",
                (LEADER_LOCK,),
            )
        ).fetchone()
    return (int(row[0]), str(row[1])) if row is not None else None


async def expiry_leader(postgres_url: str, nodes: list[ManagedProcess], first_trial: bool) -> ManagedProcess:
    """The node process whose session holds the expiry lock (waits for one to hold it)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        holder = await lock_holder(postgres_url)
        if holder is not None:
            for node in nodes:
                if holder[1] == f"{LEADER_APP}{node.pid}":
                    return node
            if first_trial:  # a build that does not name its lock session: the first node took it
                return nodes[0]
        await asyncio.sleep(0.1)
    raise AssertionError("no node took the expiry lock within 30 s")
