"""Interceptor order: the mesh wraps the call; Mesh interceptors run per attempt, first listed outermost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc

from rpcmesh.client import Mesh, MeshPolicy, MethodPolicy, ServicePolicy
from tests.integration.client.conftest import EchoFactory
from tests.support.processes import ManagedProcess


class Recorder(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        attempt = dict(client_call_details.metadata or ()).get("rpcmesh-attempt", "1")
        self.log.append(f"{self.name}>{attempt}")
        call = await continuation(client_call_details, request)
        await call.code()
        self.log.append(f"{self.name}<{attempt}")
        return call


async def test_interceptors_run_per_attempt_first_listed_outermost(
    control_plane: tuple[ManagedProcess, str], echo_instances: EchoFactory
) -> None:
    for i in range(2):
        echo_instances(f"e{i}")
    log: list[str] = []
    policy = MeshPolicy(default=ServicePolicy(method=MethodPolicy(idempotent=True), instance_breaker=None))
    async with Mesh(
        control_plane[1], policy=policy, interceptors=[Recorder("a", log), Recorder("b", log)]
    ) as mesh:
        await mesh.wait_for_instances("echo", 2)
        stub = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
        await stub.Echo(echo_pb2.EchoRequest(message="ok"))
        assert log == ["a>1", "b>1", "b<1", "a<1"]
        log.clear()
        failing = echo_pb2.EchoRequest(
            behaviour=echo_pb2.Behaviour(fail_code=grpc.StatusCode.UNAVAILABLE.value[0])
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Echo(failing)
        # Three attempts (the default max), each through both interceptors, numbered in metadata.
        assert log == [
            f"{n}{d}{i}" for i in "123" for n, d in (("a", ">"), ("b", ">"), ("b", "<"), ("a", "<"))
        ]
