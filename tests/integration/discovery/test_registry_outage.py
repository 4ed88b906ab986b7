"""The mesh client rides over a Registry outage: last known instances keep serving, the watch resumes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from echo.v1 import echo_pb2, echo_pb2_grpc

from rpcmesh.client import Mesh, MeshPolicy, MethodPolicy, ServicePolicy
from tests.support.processes import (
    ManagedProcess,
    python_env,
    rpcmesh_command,
    start_control_plane,
    start_echo,
)


async def test_calls_continue_while_the_registry_is_down_and_the_watch_resumes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    plane, address = start_control_plane(data_dir)
    port = address.rsplit(":", 1)[1]
    started: list[ManagedProcess] = [plane]
    try:
        started.append(start_echo(address, "echo-a", "--ttl", "30"))
        policy = MeshPolicy(default=ServicePolicy(method=MethodPolicy(idempotent=True, timeout=5)))
        async with Mesh(address, policy=policy) as mesh:
            stub = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
            assert (await stub.Echo(echo_pb2.EchoRequest(message="before"))).instance_id == "echo-a"

            plane.kill()
            outage_ends = time.monotonic() + 2.0
            served_during_outage = 0
            while time.monotonic() < outage_ends:
                reply = await stub.Echo(echo_pb2.EchoRequest(message="during"))
                assert reply.instance_id == "echo-a"
                served_during_outage += 1
                await asyncio.sleep(0.02)
            assert served_during_outage > 10

            # The Registry comes back on the same address with the same data.
            plane = ManagedProcess(
                rpcmesh_command("up", "--port", port, "--data-dir", str(data_dir)), env=python_env()
            )
            started.append(plane)
            assert plane.wait_for_address() == address
            started.append(start_echo(address, "echo-b", "--ttl", "30"))

            # The client learns of echo-b only through its resumed watch.
            await mesh.wait_for_instances("echo", count=2, within=20)
            seen = {(await stub.Echo(echo_pb2.EchoRequest(message="after"))).instance_id for _ in range(20)}
            assert seen == {"echo-a", "echo-b"}
    finally:
        for proc in started:
            proc.kill()
