"""The gateway as a real process: four RPC shapes, metadata, deadlines, errors, a kill under load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc

from tests.support.processes import ManagedProcess, start_echo, start_gateway

POLICY = """\
services:
  echo:
    method: {idempotent: true, timeout: 5s, retry: {max_attempts: 4, initial_backoff: 20ms}}
    instance_breaker: {consecutive_failures: 2, open_duration: 30s}
"""


@pytest.fixture
def mesh_with_gateway(
    control_plane: tuple[ManagedProcess, str], tmp_path: Path
) -> Iterator[tuple[str, list[ManagedProcess]]]:
    _, registry = control_plane
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    started: list[ManagedProcess] = []
    try:
        for name in ("echo-a", "echo-b"):
            started.append(start_echo(registry, name))
        gateway, address = start_gateway(registry, "--policy", str(policy))
        started.append(gateway)
        yield address, started[:2]
    finally:
        for proc in started:
            proc.kill()


async def test_all_four_shapes_metadata_and_errors(
    mesh_with_gateway: tuple[str, list[ManagedProcess]],
) -> None:
    address, _ = mesh_with_gateway
    async with grpc.aio.insecure_channel(address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        call = stub.Echo(echo_pb2.EchoRequest(message="hi"), metadata=(("x-tenant", "t-1"),), timeout=10)
        reply = await call
        assert reply.message == "hi"
        assert reply.instance_id in {"echo-a", "echo-b"}
        assert ("echoed-x-tenant", "t-1") in tuple(await call.trailing_metadata())

        expanded = [
            r.message async for r in stub.Expand(echo_pb2.ExpandRequest(message="x", repeat=3), timeout=10)
        ]
        assert expanded == ["x", "x", "x"]

        async def parts() -> AsyncIterator[echo_pb2.CollectRequest]:
            for word in ("a", "b", "c"):
                yield echo_pb2.CollectRequest(message=word)

        collected = await stub.Collect(parts(), timeout=10)
        assert collected.message == "a b c"

        async def chat() -> AsyncIterator[echo_pb2.ChatRequest]:
            for word in ("one", "two"):
                yield echo_pb2.ChatRequest(message=word)

        assert [r.message async for r in stub.Chat(chat(), timeout=10)] == ["one", "two"]

        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Echo(
                echo_pb2.EchoRequest(
                    behaviour=echo_pb2.Behaviour(fail_code=grpc.StatusCode.FAILED_PRECONDITION.value[0])
                ),
                timeout=10,
            )
        assert failed.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert failed.value.details().startswith("asked to fail with FAILED_PRECONDITION by echo-")

        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.Echo(echo_pb2.EchoRequest(behaviour=echo_pb2.Behaviour(delay_ms=3000)), timeout=0.5)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.5


async def test_unknown_service_is_unavailable(mesh_with_gateway: tuple[str, list[ManagedProcess]]) -> None:
    address, _ = mesh_with_gateway
    async with grpc.aio.insecure_channel(address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Echo(
                echo_pb2.EchoRequest(), metadata=(("x-rpcmesh-service", "nobody-here"),), timeout=3
            )
        assert missing.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.mark.fault
async def test_an_instance_killed_under_load_is_ridden_over(
    mesh_with_gateway: tuple[str, list[ManagedProcess]],
) -> None:
    address, instances = mesh_with_gateway
    failures: list[str] = []
    answered_by: list[tuple[float, str]] = []
    stop = asyncio.Event()

    async with grpc.aio.insecure_channel(address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)

        async def worker() -> None:
            while not stop.is_set():
                try:
                    reply = await stub.Echo(echo_pb2.EchoRequest(message="load"), timeout=10)
                    answered_by.append((time.monotonic(), reply.instance_id))
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

        workers = [asyncio.create_task(worker()) for _ in range(8)]
        await asyncio.sleep(1.5)
        instances[0].kill()
        killed_at = time.monotonic()
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.gather(*workers)

    assert failures == []
    assert len(answered_by) > 50
    late = [who for when, who in answered_by if when > killed_at + 1.0]
    assert late and set(late) == {"echo-b"}
