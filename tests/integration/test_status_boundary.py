"""The status boundary: a StatusError raised in any RPC shape reaches the client as its precise status.

Both boundaries: ``StatusErrorInterceptor``, and the control plane's security guard applied at
registration (``guard_server``, authentication off), which maps StatusErrors in its own wrapper.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from google.rpc import error_details_pb2

from rpcmesh import errors
from rpcmesh.security.guard import CallGuard, guard_server
from rpcmesh.security.identity import Authenticator
from rpcmesh.security.limits import Limits


class RefusingEcho(echo_pb2_grpc.EchoServicer):
    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext
    ) -> echo_pb2.EchoResponse:
        raise errors.invalid_argument("message", "must not be empty")

    async def Expand(
        self, request: echo_pb2.ExpandRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[echo_pb2.ExpandResponse]:
        yield echo_pb2.ExpandResponse(message="first")
        raise errors.NotFoundError("no more")

    async def Collect(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for _ in request_iterator:
            pass
        raise errors.PermissionDeniedError("not yours")

    async def Chat(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for request in request_iterator:
            yield echo_pb2.ChatResponse(message=request.message)
        raise errors.ResourceExhaustedError("too many")


@pytest.fixture(params=["interceptor", "guard"])
async def refusing_server(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "interceptor":
        server = grpc.aio.server(interceptors=[errors.StatusErrorInterceptor()])
        echo_pb2_grpc.add_EchoServicer_to_server(RefusingEcho(), server)
    else:
        server = grpc.aio.server()
        guard = CallGuard(authenticator=Authenticator(), policy=None, limits=Limits())
        echo_pb2_grpc.add_EchoServicer_to_server(RefusingEcho(), guard_server(server, guard))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_all_four_shapes_map_status_errors(refusing_server: str) -> None:
    async with grpc.aio.insecure_channel(refusing_server) as channel:
        for _ in range(2):  # the second time through reuses the wrappers built the first time
            await _check_all_four_shapes(echo_pb2_grpc.EchoStub(channel))


async def _check_all_four_shapes(stub: echo_pb2_grpc.EchoStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Echo(echo_pb2.EchoRequest())
    mapped = errors.from_rpc_error(unary.value)
    assert isinstance(mapped, errors.InvalidArgumentError)
    assert mapped.message == "message: must not be empty"
    bad_request = mapped.detail(error_details_pb2.BadRequest)
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    assert bad_request.field_violations[0].field == "message"

    call = stub.Expand(echo_pb2.ExpandRequest())
    assert (await call.read()).message == "first"
    with pytest.raises(grpc.aio.AioRpcError) as server_stream:
        await call.read()
    assert server_stream.value.code() is grpc.StatusCode.NOT_FOUND

    async def requests() -> AsyncIterator[echo_pb2.CollectRequest]:
        yield echo_pb2.CollectRequest(message="a")

    with pytest.raises(grpc.aio.AioRpcError) as client_stream:
        await stub.Collect(requests())
    assert client_stream.value.code() is grpc.StatusCode.PERMISSION_DENIED

    async def chat() -> AsyncIterator[echo_pb2.ChatRequest]:
        yield echo_pb2.ChatRequest(message="hi")

    replies = []
    with pytest.raises(grpc.aio.AioRpcError) as bidi:
        async for reply in stub.Chat(chat()):
            replies.append(reply.message)
    assert replies == ["hi"]
    assert bidi.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert bidi.value.details() == "too many"
