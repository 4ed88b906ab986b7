"""Small helpers for Registry tests: build requests, poll for conditions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from google.protobuf import duration_pb2
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc


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
