"""The sync mesh against real Echo processes: same policies and core as the asyncio mesh."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc

from rpcmesh.client import (
    BreakerPolicy,
    BreakerState,
    HedgingPolicy,
    MeshPolicy,
    MethodPolicy,
    RetryPolicy,
    ServicePolicy,
    SyncMesh,
)
from tests.integration.client.conftest import EchoFactory
from tests.support.processes import ManagedProcess

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


def total_picks(mesh: SyncMesh) -> int:
    return sum(view.picks for view in mesh.endpoints("echo"))


def test_sync_shapes_raw_bytes_and_round_robin(
    control_plane: tuple[ManagedProcess, str], echo_instances: EchoFactory
) -> None:
    for i in range(2):
        echo_instances(f"e{i}")
    with SyncMesh(control_plane[1]) as mesh:
        mesh.wait_for_instances("echo", 2)
        channel = mesh.channel("echo")
        stub = echo_pb2_grpc.EchoStub(channel)
        served = sorted(stub.Echo(echo_pb2.EchoRequest(message="hi")).instance_id for _ in range(4))
        assert served == ["e0", "e0", "e1", "e1"]
        assert [r.message for r in stub.Expand(echo_pb2.ExpandRequest(message="x", repeat=2))] == ["x", "x"]
        assert stub.Collect(iter([echo_pb2.CollectRequest(message=m) for m in "ab"])).message == "a b"
        assert [r.message for r in stub.Chat(iter([echo_pb2.ChatRequest(message="c")]))] == ["c"]
        raw = channel.unary_unary("/echo.v1.Echo/Echo")(
            echo_pb2.EchoRequest(message="raw").SerializeToString()
        )
        assert echo_pb2.EchoResponse.FromString(raw).message == "raw"


@pytest.mark.fault
@pytest.mark.slow
def test_sync_kill_9_under_load_loses_no_call(
    control_plane: tuple[ManagedProcess, str], echo_instances: EchoFactory
) -> None:
    procs = [echo_instances(f"e{i}") for i in range(3)]
    policy = MeshPolicy(default=ServicePolicy(method=MethodPolicy(idempotent=True, timeout=5)))
    with SyncMesh(control_plane[1], policy=policy) as mesh:
        mesh.wait_for_instances("echo", 3)
        stub = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
        failures: list[BaseException] = []
        calls = [0]
        stop_at = time.monotonic() + 10

        def worker() -> None:
            while time.monotonic() < stop_at:
                try:
                    stub.Echo(echo_pb2.EchoRequest(message="load", behaviour=echo_pb2.Behaviour(delay_ms=5)))
                    calls[0] += 1
                except grpc.RpcError as exc:
                    failures.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        procs[2].kill()
        time.sleep(1.0)
        dead = {v.instance_id: v.picks for v in mesh.endpoints("echo")}.get("e2", 0)
        for thread in threads:
            thread.join()
        assert failures == []
        assert calls[0] > 100
        assert {v.instance_id: v.picks for v in mesh.endpoints("echo")}.get("e2", dead) == dead


def test_sync_budget_breaker_hedging_and_idempotency(
    control_plane: tuple[ManagedProcess, str], echo_instances: EchoFactory
) -> None:
    echo_instances("slow", "--delay-ms", "2000")
    echo_instances("fast")
    failing = echo_pb2.EchoRequest(behaviour=echo_pb2.Behaviour(fail_code=UNAVAILABLE))
    policy = MeshPolicy(
        services={
            "echo": ServicePolicy(
                method=MethodPolicy(
                    idempotent=True, retry=RetryPolicy(max_attempts=5, initial_backoff=0.001)
                ),
                methods={
                    "Echo": MethodPolicy(idempotent=True, hedging=HedgingPolicy(delay=0.05)),
                    "Collect": MethodPolicy(idempotent=False),
                },
                instance_breaker=BreakerPolicy(consecutive_failures=3, open_duration=1.0, half_open_probes=1),
                service_breaker=None,
            )
        }
    )
    with SyncMesh(control_plane[1], policy=policy) as mesh:
        mesh.wait_for_instances("echo", 2)
        stub = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
        # Hedging: the fast instance answers although the slow one is picked half the time.
        for _ in range(4):
            started = time.monotonic()
            assert stub.Echo(echo_pb2.EchoRequest(message="h"), timeout=10).instance_id == "fast"
            assert time.monotonic() - started < 1.0
        # Breakers open on failures and the state is readable.
        for _ in range(10):
            with pytest.raises(grpc.RpcError):
                list(stub.Expand(echo_pb2.ExpandRequest(repeat=1, behaviour=failing.behaviour)))
        states = {name: snap.state for name, snap in mesh.breakers("echo").items()}
        assert BreakerState.OPEN in states.values()
    # Non-idempotent (the default): one attempt only, although UNAVAILABLE is retryable.
    with SyncMesh(control_plane[1]) as plain:
        plain.wait_for_instances("echo", 2)
        stub = echo_pb2_grpc.EchoStub(plain.channel("echo"))
        before = total_picks(plain)
        with pytest.raises(grpc.RpcError):
            stub.Echo(failing)
        assert total_picks(plain) - before == 1
