"""Server reflection v1 (as grpcurl and grpc-node ask for it) on `rpcmesh up` and a service host.

A raw gRPC client, built on nothing of rpcmesh, calls
``grpc.reflection.v1.ServerReflection`` on both processes: it lists the services
and resolves a service's file. v1alpha and the health check still answer. The
gateway's shape learning falls back to v1alpha on a backend that serves only
v1alpha (a stock grpcio-reflection server). With TLS and tokens, v1 is open to
any listed identity and refused without credentials, as v1alpha is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from rpcmesh.gateway.shapes import Shape, ShapeCache
from rpcmesh.security.client import ClientSecurity, aio_channel, sync_channel
from tests.integration.wiring.conftest import Pki, Processes
from tests.support.processes import ManagedProcess, start_echo

V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


async def _reflect(
    channel: grpc.aio.Channel, method: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    # v1 and v1alpha share their messages field for field: v1alpha's classes read v1's bytes.
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield request

    responses = [response async for response in call(requests(), timeout=10)]
    assert len(responses) == 1
    return responses[0]


def _refusal(address: str, security: ClientSecurity) -> grpc.StatusCode:
    """The status of a v1 list request, asked with the blocking client.

    Not grpc.aio: when the server refuses a client-streaming call before the client's request
    write completes, grpc.aio reports INTERNAL ("Failed execute_batch: SendMessageOperation")
    instead of the server's status (grpc/grpc#36066); the blocking client keeps the server's.
    """
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with sync_channel(address, security) as channel:
        call = channel.stream_stream(
            V1,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        try:
            list(call(iter([request]), timeout=10))
        except grpc.RpcError as error:
            return error.code()  # type: ignore[attr-defined, no-any-return]
    raise AssertionError(f"{address} answered reflection v1 without credentials")


async def _services(channel: grpc.aio.Channel, method: str) -> set[str]:
    response = await _reflect(channel, method, reflection_pb2.ServerReflectionRequest(list_services=""))
    return {service.name for service in response.list_services_response.service}


async def _file_services(channel: grpc.aio.Channel, symbol: str) -> set[str]:
    """The services declared in the files v1 reflection returns for symbol."""
    response = await _reflect(
        channel, V1, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    )
    assert response.HasField("file_descriptor_response"), response
    names = set()
    for raw in response.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        names |= {f"{proto.package}.{service.name}" for service in proto.service}
    return names


async def test_v1_reflection_on_control_plane_and_service_host(
    control_plane: tuple[ManagedProcess, str],
) -> None:
    _, registry = control_plane
    echo = start_echo(registry, "echo-reflect")
    try:
        echo_address = echo.wait_for_address()
        for address, served in ((registry, "rpcmesh.v1.Registry"), (echo_address, "echo.v1.Echo")):
            async with grpc.aio.insecure_channel(address) as channel:
                listed = await _services(channel, V1)
                assert {
                    served,
                    "grpc.health.v1.Health",
                    "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection",
                } <= listed, (address, listed)
                assert await _services(channel, V1ALPHA) == listed
                assert served in await _file_services(channel, served)
                assert "grpc.reflection.v1.ServerReflection" in await _file_services(
                    channel, "grpc.reflection.v1.ServerReflection"
                )
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=10
                )
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                cache = ShapeCache()
                if served == "echo.v1.Echo":
                    assert await cache.shape(channel, served, "Expand") == Shape.UNARY_STREAM
    finally:
        echo.kill()


async def test_shapes_fall_back_to_v1alpha() -> None:
    # A backend with stock grpcio-reflection: v1 is UNIMPLEMENTED there.
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_pb2_grpc.HealthServicer(), server)
    names = ["grpc.health.v1.Health", reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            shape = await ShapeCache().shape(channel, "grpc.health.v1.Health", "Watch")
            assert shape == Shape.UNARY_STREAM
    finally:
        await server.stop(None)


async def test_v1_reflection_behind_tls_and_tokens(pki: Pki, processes: Processes) -> None:
    plane_args = [
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-ca",
        str(pki.ca),
    ]
    registry = processes.control_plane(
        *plane_args, "--policy", str(pki.policy), "--token-secret-file", str(pki.secret_file)
    )
    host_env = {
        "RPCMESH_TLS_CERT": str(pki.server_cert),
        "RPCMESH_TLS_KEY": str(pki.server_key),
        "RPCMESH_TLS_CA": str(pki.ca),
        "RPCMESH_TOKEN_SECRET_FILE": str(pki.secret_file),
        "RPCMESH_TOKEN": pki.token("echo"),
    }
    _, host = processes.echo(registry, "echo-1", host_env)
    for address, served in ((registry, "rpcmesh.v1.Registry"), (host, "echo.v1.Echo")):
        async with aio_channel(address, pki.token_client("client")) as channel:
            assert served in await _services(channel, V1)
        refused = await asyncio.to_thread(_refusal, address, pki.token_client(None))
        assert refused == grpc.StatusCode.UNAUTHENTICATED
