"""Rich error details reach a plain gRPC client through the gateway, as docs/concepts.md says.

A real ServiceHost (registered as ``strict``) fails with a ``google.rpc.BadRequest``;
a client built on grpcio alone, calling through a real `rpcmesh gateway` process
routed by the ``x-rpcmesh-service`` header, decodes ``grpc-status-details-bin`` as
``google.rpc.Status`` and unpacks the BadRequest naming the field.
"""

from __future__ import annotations

import grpc
import grpc.aio
from echo.v1 import echo_pb2, echo_pb2_grpc
from google.rpc import error_details_pb2, status_pb2

from rpcmesh.errors import invalid_argument
from rpcmesh.host import ServiceHost, ServiceHostConfig
from tests.support.processes import ManagedProcess, start_gateway


class StrictServicer(echo_pb2_grpc.EchoServicer):
    """Refuses an empty message, as rpcmesh servers refuse bad fields."""

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext
    ) -> echo_pb2.EchoResponse:
        if not request.message:
            raise invalid_argument("message", "required")
        return echo_pb2.EchoResponse(message=request.message, instance_id="strict-1")


async def test_bad_request_details_pass_the_gateway(control_plane: tuple[ManagedProcess, str]) -> None:
    _, registry = control_plane
    host = ServiceHost(
        ServiceHostConfig(service="strict", registry=[registry], instance_id="strict-1", ttl=5)
    )
    host.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, StrictServicer())
    async with host:
        gateway, address = start_gateway(registry)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = echo_pb2_grpc.EchoStub(channel)
                route = (("x-rpcmesh-service", "strict"),)
                reply = await stub.Echo(echo_pb2.EchoRequest(message="hi"), metadata=route, timeout=10)
                assert reply.instance_id == "strict-1"
                call = stub.Echo(echo_pb2.EchoRequest(), metadata=route, timeout=10)
                try:
                    await call
                    raise AssertionError("an empty message was accepted")
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert error.details() == "message: required"
                    trailers = dict(error.trailing_metadata() or ())
            status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
            assert (status.code, status.message) == (
                grpc.StatusCode.INVALID_ARGUMENT.value[0],
                "message: required",
            )
            assert [detail.type_url for detail in status.details] == [
                "type.googleapis.com/google.rpc.BadRequest"
            ]
            bad_request = error_details_pb2.BadRequest()
            assert status.details[0].Unpack(bad_request)
            violations = [(v.field, v.description) for v in bad_request.field_violations]
            assert violations == [("message", "required")]
        finally:
            gateway.kill()
