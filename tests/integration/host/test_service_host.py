"""ServiceHost with a real `rpcmesh up`: registration, lease recovery, SIGTERM, deadline propagation."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest
from echo.servicer import EchoServicer
from echo.v1 import echo_pb2, echo_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from rpcmesh.client import Mesh, MeshPolicy, MethodPolicy, ServicePolicy, current_call
from rpcmesh.host import ServiceHost, ServiceHostConfig
from tests.support.processes import ROOT, ManagedProcess, python_env, start_control_plane


async def resolve(registry: str, service: str) -> list[registry_pb2.Instance]:
    async with grpc.aio.insecure_channel(registry) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        return list((await stub.Resolve(registry_pb2.ResolveRequest(service=service), timeout=5)).instances)


async def wait_until(predicate: object, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not await predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_host_serves_health_reflection_registers_and_deregisters(
    control_plane: tuple[ManagedProcess, str],
) -> None:
    registry = control_plane[1]
    host = ServiceHost(ServiceHostConfig(service="echo", registry=registry, instance_id="h1", ttl=5))
    host.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, EchoServicer("h1"))
    async with host:
        instances = await resolve(registry, "echo")
        assert [(i.instance_id, i.address) for i in instances] == [("h1", host.address)]
        async with grpc.aio.insecure_channel(host.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="")
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = [s.name async for a in answers for s in a.list_services_response.service]
            assert "echo.v1.Echo" in names and "grpc.health.v1.Health" in names
    assert await resolve(registry, "echo") == []


@pytest.mark.fault
@pytest.mark.slow
async def test_host_registers_again_after_the_registry_lost_its_lease(tmp_path: Path) -> None:
    first, registry = start_control_plane(tmp_path / "one")
    host = ServiceHost(ServiceHostConfig(service="echo", registry=registry, instance_id="h1", ttl=2))
    host.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, EchoServicer("h1"))
    second: ManagedProcess | None = None
    try:
        await host.start()
        first.kill()
        # A new, empty registry on the same address: the lease is unknown there.
        port = registry.rsplit(":", 1)[1]
        second = ManagedProcess(
            [sys.executable, "-m", "rpcmesh", "up", "--port", port, "--data-dir", str(tmp_path / "two")],
            env=python_env(),
        )
        second.wait_for_address()

        async def registered_again() -> bool:
            try:
                return [i.instance_id for i in await resolve(registry, "echo")] == ["h1"]
            except grpc.aio.AioRpcError:
                return False

        await wait_until(registered_again, within=20)
        assert host.lease is not None and host.lease.registrations >= 2
    finally:
        try:
            await host.stop(grace=0)
        finally:  # the control planes go even when stopping the host fails
            first.kill()
            if second is not None:
                second.kill()


@pytest.mark.fault
@pytest.mark.slow
async def test_sigterm_under_load_loses_no_in_flight_call(control_plane: tuple[ManagedProcess, str]) -> None:
    registry = control_plane[1]
    procs = [
        ManagedProcess(
            [
                sys.executable,
                str(ROOT / "examples/echo/server.py"),
                "--registry",
                registry,
                "--instance-id",
                f"e{i}",
            ],
            env=python_env(),
        )
        for i in range(2)
    ]
    try:
        for proc in procs:
            proc.wait_for_address()
        # Not idempotent: only attempts that never reached a server may be retried,
        # so a call lost in flight would surface as a failure.
        policy = MeshPolicy(default=ServicePolicy(method=MethodPolicy(idempotent=False, timeout=10)))
        async with Mesh(registry, policy=policy) as mesh:
            await mesh.wait_for_instances("echo", 2)
            stub = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
            failures: list[BaseException] = []
            answered_by: list[str] = []
            stop_at = time.monotonic() + 4

            async def worker() -> None:
                while time.monotonic() < stop_at:
                    try:
                        reply = await stub.Echo(
                            echo_pb2.EchoRequest(behaviour=echo_pb2.Behaviour(delay_ms=200))
                        )
                        answered_by.append(reply.instance_id)
                    except grpc.aio.AioRpcError as exc:
                        failures.append(exc)

            workers = [asyncio.create_task(worker()) for _ in range(8)]
            await asyncio.sleep(1.5)
            sent_before = answered_by.count("e0")
            procs[0].signal(signal.SIGTERM)
            await asyncio.gather(*workers)
            assert procs[0].proc.wait(timeout=15) == 0
            assert failures == []
            assert answered_by.count("e0") > sent_before  # calls in flight at SIGTERM were answered
            assert "echo stopped" in procs[0].output()
    finally:
        for proc in procs:
            proc.kill()


class Downstream(echo_pb2_grpc.EchoServicer):
    def __init__(self) -> None:
        self.cancelled_at: float | None = None

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext
    ) -> echo_pb2.EchoResponse:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            self.cancelled_at = time.monotonic()
            raise
        return echo_pb2.EchoResponse(message="late")


class Front(echo_pb2_grpc.EchoServicer):
    def __init__(self, mesh: Mesh) -> None:
        self.stub = echo_pb2_grpc.EchoStub(mesh.channel("down"))
        self.seen_deadline: float | None = None

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext
    ) -> echo_pb2.EchoResponse:
        incoming = current_call.get()
        self.seen_deadline = incoming.deadline if incoming else None
        return await self.stub.Echo(request)  # no timeout of its own: bounded by the incoming call


async def test_incoming_deadline_bounds_and_cancels_the_downstream_call(
    control_plane: tuple[ManagedProcess, str],
) -> None:
    registry = control_plane[1]
    downstream = Downstream()
    async with Mesh(
        registry, policy=MeshPolicy(default=ServicePolicy(method=MethodPolicy(retry=None)))
    ) as mesh:
        down = ServiceHost(ServiceHostConfig(service="down", registry=registry), drain_delay=0)
        down.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, downstream)
        front_servicer = Front(mesh)
        front = ServiceHost(ServiceHostConfig(service="front", registry=registry), drain_delay=0)
        front.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, front_servicer)
        async with down, front:
            await mesh.wait_for_instances("down", 1)
            stub = echo_pb2_grpc.EchoStub(mesh.channel("front"))
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=0.5)
            assert failed.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert front_servicer.seen_deadline is not None
            await wait_until(lambda: asyncio.sleep(0, downstream.cancelled_at is not None), within=5)
            assert downstream.cancelled_at is not None
            assert downstream.cancelled_at - started < 2.0  # not the 10 s the handler would sleep
