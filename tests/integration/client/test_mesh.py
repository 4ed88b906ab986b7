"""The asyncio mesh against real Echo processes and a real `rpcmesh up`."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc

from rpcmesh.client import (
    BreakerPolicy,
    BreakerState,
    HedgingPolicy,
    Mesh,
    MeshPolicy,
    MethodPolicy,
    RetryPolicy,
    ServicePolicy,
)
from tests.integration.client.conftest import EchoFactory
from tests.support.processes import ManagedProcess

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


def mesh_for(control_plane: tuple[ManagedProcess, str], **service: object) -> Mesh:
    return Mesh(control_plane[1], policy=MeshPolicy(default=ServicePolicy(**service)))  # type: ignore[arg-type]


def picks(mesh: Mesh) -> dict[str, int]:
    return {view.instance_id: view.picks for view in mesh.endpoints("echo")}


async def test_all_four_shapes_raw_bytes_and_round_robin(
    control_plane: tuple[ManagedProcess, str], echo_instances: EchoFactory
) -> None:
    for i in range(3):
        echo_instances(f"e{i}")
    async with Mesh(control_plane[1]) as mesh:
        await mesh.wait_for_instances("echo", 3)
        channel = mesh.channel("echo")
        stub = echo_pb2_grpc.EchoStub(channel)
        served = [(await stub.Echo(echo_pb2.EchoRequest(message="hi"))).instance_id for _ in range(9)]
        assert sorted(served) == ["e0"] * 3 + ["e1"] * 3 + ["e2"] * 3
        expanded = [r.message async for r in stub.Expand(echo_pb2.ExpandRequest(message="x", repeat=3))]
        assert expanded == ["x", "x", "x"]
        collected = await stub.Collect(iter([echo_pb2.CollectRequest(message=m) for m in "abc"]))
        assert collected.message == "a b c"

        async def chat() -> object:
            for m in "de":
                yield echo_pb2.ChatRequest(message=m)

        assert [r.message async for r in stub.Chat(chat())] == ["d", "e"]
        writer = stub.Chat()
        await writer.write(echo_pb2.ChatRequest(message="w"))
        assert (await writer.read()).message == "w"
        await writer.done_writing()
        assert await writer.read() is grpc.aio.EOF
        raw = await channel.unary_unary("/echo.v1.Echo/Echo")(
            echo_pb2.EchoRequest(message="raw").SerializeToString()
        )
        assert isinstance(raw, bytes) and echo_pb2.EchoResponse.FromString(raw).message == "raw"
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Echo(echo_pb2.EchoRequest(behaviour=echo_pb2.Behaviour(fail_code=5)))
        assert failed.value.code() is grpc.StatusCode.NOT_FOUND


async def test_unknown_service_fails_fast_with_unavailable(control_plane: tuple[ManagedProcess, str]) -> None:
    async with Mesh(control_plane[1]) as mesh:
        stub = echo_pb2_grpc.EchoStub(mesh.channel("nobody"))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Echo(echo_pb2.EchoRequest(), timeout=5)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "no passing instance of service 'nobody'" in (failed.value.details() or "")


@pytest.mark.fault
@pytest.mark.slow
async def test_kill_9_under_steady_load_loses_no_call(
    control_plane: tuple[ManagedProcess, str], echo_instances: EchoFactory
) -> None:
    procs = [echo_instances(f"e{i}") for i in range(3)]
    policy = ServicePolicy(method=MethodPolicy(idempotent=True, timeout=5))
    async with Mesh(control_plane[1], policy=MeshPolicy(default=policy)) as mesh:
        await mesh.wait_for_instances("echo", 3)
        stub = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
        failures: list[BaseException] = []
        calls = 0
        stop_at = time.monotonic() + 10

        async def worker() -> None:
            nonlocal calls
            while time.monotonic() < stop_at:
                try:
                    await stub.Echo(
                        echo_pb2.EchoRequest(message="load", behaviour=echo_pb2.Behaviour(delay_ms=5))
                    )
                    calls += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc)

        workers = [asyncio.create_task(worker()) for _ in range(8)]
        await asyncio.sleep(3)
        procs[1].kill()
        await asyncio.sleep(1.0)
        dead_picks_after_1s = picks(mesh).get("e1", 0)
        await asyncio.gather(*workers)
        assert failures == []
        assert calls > 100
        # Either the instance is gone (lease expired) or it got no pick after the first second.
        assert picks(mesh).get("e1", dead_picks_after_1s) == dead_picks_after_1s


@pytest.mark.slow
async def test_retry_budget_bounds_attempts_on_an_always_failing_backend(
    control_plane: tuple[ManagedProcess, str], echo_instances: EchoFactory
) -> None:
    for i in range(2):
        echo_instances(f"e{i}")
    policy = ServicePolicy(
        method=MethodPolicy(idempotent=True, retry=RetryPolicy(max_attempts=5, initial_backoff=0.001)),
        instance_breaker=None,
        service_breaker=None,
    )
    async with Mesh(control_plane[1], policy=MeshPolicy(default=policy)) as mesh:
        await mesh.wait_for_instances("echo", 2)
        stub = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
        failing = echo_pb2.EchoRequest(behaviour=echo_pb2.Behaviour(fail_code=UNAVAILABLE))

        async def burst(n: int) -> None:
            for _ in range(n):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Echo(failing)

        await burst(100)  # warm-up: the budget drains
        before = sum(picks(mesh).values())
        await burst(200)
        attempts = sum(picks(mesh).values()) - before
        assert attempts / 200 <= 1.1


async def test_breaker_opens_half_opens_and_closes(
    control_plane: tuple[ManagedProcess, str], echo_instances: EchoFactory
) -> None:
    echo_instances("only")
    breaker = BreakerPolicy(consecutive_failures=3, open_duration=1.0, half_open_probes=2)
    policy = ServicePolicy(method=MethodPolicy(retry=None), instance_breaker=breaker, service_breaker=None)
    async with Mesh(control_plane[1], policy=MeshPolicy(default=policy)) as mesh:
        await mesh.wait_for_instances("echo", 1)
        stub = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
        failing = echo_pb2.EchoRequest(behaviour=echo_pb2.Behaviour(fail_code=UNAVAILABLE))
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.Echo(failing)
            assert "asked to fail" in (failed.value.details() or "")
        assert mesh.breakers("echo")["instance echo/only"].state is BreakerState.OPEN
        # Its only instance ejected: panic routing sends the call there anyway, rather than fail
        # it; an outcome while open does not count, so the breaker stays open until it half-opens.
        assert (await stub.Echo(echo_pb2.EchoRequest(message="panic"))).instance_id == "only"
        assert mesh.breakers("echo")["instance echo/only"].state is BreakerState.OPEN
        deadline = time.monotonic() + 10
        while mesh.breakers("echo")["instance echo/only"].state is not BreakerState.HALF_OPEN:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        for _ in range(2):
            await stub.Echo(echo_pb2.EchoRequest(message="probe"))
        assert mesh.breakers("echo")["instance echo/only"].state is BreakerState.CLOSED


@pytest.mark.slow
async def test_hedged_call_returns_at_the_fast_instance_latency(
    control_plane: tuple[ManagedProcess, str], echo_instances: EchoFactory
) -> None:
    echo_instances("slow", "--delay-ms", "2000")
    echo_instances("fast")
    hedged = MethodPolicy(idempotent=True, hedging=HedgingPolicy(max_attempts=2, delay=0.05))
    async with Mesh(control_plane[1], policy=MeshPolicy(default=ServicePolicy(method=hedged))) as mesh:
        await mesh.wait_for_instances("echo", 2)
        stub = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
        for _ in range(6):
            started = time.monotonic()
            reply = await stub.Echo(echo_pb2.EchoRequest(message="h"), timeout=10)
            assert reply.instance_id == "fast"
            assert time.monotonic() - started < 1.0
        assert all(view.outstanding == 0 for view in mesh.endpoints("echo"))


async def test_non_idempotent_call_is_not_resent_after_reaching_a_server(
    control_plane: tuple[ManagedProcess, str], echo_instances: EchoFactory
) -> None:
    for i in range(2):
        echo_instances(f"e{i}")
    policy = ServicePolicy(
        method=MethodPolicy(idempotent=False),
        methods={"Expand": MethodPolicy(idempotent=True)},
        instance_breaker=None,
    )
    async with Mesh(control_plane[1], policy=MeshPolicy(default=policy)) as mesh:
        await mesh.wait_for_instances("echo", 2)
        stub = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
        failing = echo_pb2.Behaviour(fail_code=UNAVAILABLE)
        before = sum(picks(mesh).values())
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Echo(echo_pb2.EchoRequest(behaviour=failing))
        assert sum(picks(mesh).values()) - before == 1
        before = sum(picks(mesh).values())
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in stub.Expand(echo_pb2.ExpandRequest(repeat=1, behaviour=failing)):
                pass
        assert sum(picks(mesh).values()) - before == 3  # idempotent: retried up to max_attempts
