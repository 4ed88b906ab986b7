"""The mesh channel raises rpcmesh's typed errors, which are still grpc's errors.

A real ServiceHost answers NOT_FOUND (with a ``google.rpc.ErrorInfo`` rich detail) from each RPC
shape; the aio and the sync mesh must raise something that ``except NotFoundError``,
``except grpc.RpcError`` and (aio) ``except grpc.aio.AioRpcError`` all catch, with the code,
message, trailing metadata and rich details intact.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator, Iterator

import grpc
import grpc.aio
import pytest
from echo.servicer import EchoServicer
from echo.v1 import echo_pb2, echo_pb2_grpc
from google.rpc import error_details_pb2

from rpcmesh import Mesh, NotFoundError, StatusError, SyncMesh, UnavailableError
from rpcmesh.client._shell import MeshRpcError
from rpcmesh.errors import RpcStatusError, from_rpc_error
from rpcmesh.host import ServiceHost, ServiceHostConfig
from tests.support.processes import ManagedProcess

REASON = "ORDER_MISSING"


def missing(what: str) -> NotFoundError:
    info = error_details_pb2.ErrorInfo(reason=REASON, domain="test.rpcmesh", metadata={"what": what})
    return NotFoundError(f"{what} not found", details=[info])


class MissingServicer(EchoServicer):
    """Every RPC shape answers NOT_FOUND with an ErrorInfo detail (Expand after one response)."""

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext
    ) -> echo_pb2.EchoResponse:
        raise missing("echo")

    async def Expand(  # type: ignore[override]
        self, request: echo_pb2.ExpandRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[echo_pb2.ExpandResponse]:
        yield echo_pb2.ExpandResponse(message="first")
        raise missing("expand")

    async def Collect(
        self, request_iterator: AsyncIterator[echo_pb2.CollectRequest], context: grpc.aio.ServicerContext
    ) -> echo_pb2.CollectResponse:
        async for _ in request_iterator:
            pass
        raise missing("collect")

    async def Chat(  # type: ignore[override]
        self, request_iterator: AsyncIterator[echo_pb2.ChatRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[echo_pb2.ChatResponse]:
        async for _ in request_iterator:
            pass
        raise missing("chat")
        yield echo_pb2.ChatResponse()  # an async generator


def assert_typed(error: BaseException, what: str) -> None:
    """``error`` is every kind it should be and carries everything the server sent."""
    assert isinstance(error, NotFoundError) and isinstance(error, StatusError), type(error).__mro__
    assert isinstance(error, grpc.RpcError) and isinstance(error, grpc.aio.AioRpcError)
    assert isinstance(error, RpcStatusError)
    # rpcmesh's attributes
    assert error.code == grpc.StatusCode.NOT_FOUND and error.code.name == "NOT_FOUND"
    assert error.message == f"{what} not found"
    info = error.detail(error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo), error.details
    assert (info.reason, dict(info.metadata)) == (REASON, {"what": what})
    assert str(error) == f"NOT_FOUND: {what} not found"
    # grpc's methods, on the same object
    assert error.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[operator]
    assert error.details() == f"{what} not found"  # type: ignore[operator]
    trailing = dict(error.trailing_metadata() or ())
    assert "grpc-status-details-bin" in trailing
    # Mapped again it is a plain StatusError whose .code is the enum member; it survives pickling.
    mapped = from_rpc_error(error)
    assert type(mapped) is NotFoundError and mapped.code is grpc.StatusCode.NOT_FOUND
    assert (mapped.message, mapped.details) == (error.message, tuple(error.details))
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and copy.details == error.details and copy.message == error.message


@pytest.fixture
async def missing_host(control_plane: tuple[ManagedProcess, str]) -> AsyncIterator[str]:
    """A real ServiceHost, registered as ``missing``, whose every call fails NOT_FOUND."""
    registry = control_plane[1]
    host = ServiceHost(ServiceHostConfig(service="missing", registry=registry, instance_id="m1", ttl=5))
    host.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, MissingServicer("m1"))
    async with host:
        yield registry


async def test_aio_mesh_raises_typed_errors_for_every_rpc_shape(missing_host: str) -> None:
    async with Mesh(missing_host) as mesh:
        await mesh.wait_for_instances("missing", 1)
        stub = echo_pb2_grpc.EchoStub(mesh.channel("missing"))

        with pytest.raises(NotFoundError) as unary:
            await stub.Echo(echo_pb2.EchoRequest(message="hi"))
        assert_typed(unary.value, "echo")

        # grpc-style code keeps working unchanged
        try:
            await stub.Echo(echo_pb2.EchoRequest(message="hi"))
        except grpc.aio.AioRpcError as error:
            assert error.code() is grpc.StatusCode.NOT_FOUND
            assert error.details() == "echo not found"

        received: list[str] = []
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for response in stub.Expand(echo_pb2.ExpandRequest(message="x", repeat=3)):
                received.append(response.message)
        assert received == ["first"]
        assert_typed(streamed.value, "expand")

        with pytest.raises(grpc.RpcError) as collected:
            await stub.Collect(iter([echo_pb2.CollectRequest(message="a")]))
        assert_typed(collected.value, "collect")

        async def chat() -> AsyncIterator[echo_pb2.ChatRequest]:
            yield echo_pb2.ChatRequest(message="a")

        with pytest.raises(NotFoundError) as chatted:
            async for _ in stub.Chat(chat()):
                pass
        assert_typed(chatted.value, "chat")


async def test_errors_the_mesh_raises_itself_are_typed_too(missing_host: str) -> None:
    async with Mesh(missing_host) as mesh:
        stub = echo_pb2_grpc.EchoStub(mesh.channel("nobody"))
        with pytest.raises(UnavailableError) as failed:
            await stub.Echo(echo_pb2.EchoRequest(), timeout=5)
        error = failed.value
        assert isinstance(error, grpc.aio.AioRpcError) and isinstance(error, MeshRpcError)
        assert error.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[operator]
        assert "no passing instance of service 'nobody'" in error.message
        with pytest.raises(UnavailableError):
            async for _ in stub.Expand(echo_pb2.ExpandRequest(message="x"), timeout=5):
                pass


def sync_calls(registry: str) -> list[tuple[str, BaseException]]:
    """Each RPC shape through a SyncMesh; the error each raised."""
    raised: list[tuple[str, BaseException]] = []
    with SyncMesh(registry) as mesh:
        mesh.wait_for_instances("missing", 1)
        stub = echo_pb2_grpc.EchoStub(mesh.channel("missing"))  # type: ignore[arg-type]

        def requests() -> Iterator[echo_pb2.ChatRequest]:
            yield echo_pb2.ChatRequest(message="a")

        try:
            stub.Echo(echo_pb2.EchoRequest(message="hi"))
        except NotFoundError as error:
            raised.append(("echo", error))
        try:
            for _ in stub.Expand(echo_pb2.ExpandRequest(message="x", repeat=3)):
                pass
        except grpc.RpcError as error:
            raised.append(("expand", error))
        try:
            stub.Collect(iter([echo_pb2.CollectRequest(message="a")]))
        except NotFoundError as error:
            raised.append(("collect", error))
        try:
            for _ in stub.Chat(requests()):
                pass
        except NotFoundError as error:
            raised.append(("chat", error))
        try:
            echo_pb2_grpc.EchoStub(mesh.channel("nobody")).Echo(  # type: ignore[arg-type]
                echo_pb2.EchoRequest(), timeout=5
            )
        except UnavailableError as error:
            raised.append(("nobody", error))
    return raised


async def test_sync_mesh_raises_typed_errors_for_every_rpc_shape(missing_host: str) -> None:
    raised = await asyncio.to_thread(sync_calls, missing_host)
    assert [what for what, _ in raised] == ["echo", "expand", "collect", "chat", "nobody"]
    for what, error in raised[:4]:
        assert_typed(error, what)
    nobody = raised[4][1]
    assert isinstance(nobody, MeshRpcError) and isinstance(nobody, grpc.RpcError)


class FrontServicer(EchoServicer):
    """Calls ``missing`` through the mesh: lets its error escape, or passes it on with from_rpc_error."""

    def __init__(self, mesh: Mesh) -> None:
        super().__init__("f1")
        self.downstream = echo_pb2_grpc.EchoStub(mesh.channel("missing"))

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext
    ) -> echo_pb2.EchoResponse:
        try:
            return await self.downstream.Echo(request)
        except NotFoundError as error:
            if request.message == "pass it on":
                raise from_rpc_error(error) from error
            raise


async def test_a_dependency_error_escaping_a_handler_is_not_passed_on_blindly(missing_host: str) -> None:
    async with Mesh(missing_host) as mesh:
        front = ServiceHost(
            ServiceHostConfig(service="front", registry=missing_host, instance_id="f1", ttl=5)
        )
        front.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, FrontServicer(mesh))
        async with front:
            await mesh.wait_for_instances("front", 1)
            await mesh.wait_for_instances("missing", 1)
            stub = echo_pb2_grpc.EchoStub(mesh.channel("front"))
            with pytest.raises(StatusError) as escaped:
                await stub.Echo(echo_pb2.EchoRequest(message="hi"))
            # as before mesh errors were StatusErrors: an unexpected exception in the handler
            assert escaped.value.code == grpc.StatusCode.UNKNOWN, escaped.value
            with pytest.raises(NotFoundError) as passed:
                await stub.Echo(echo_pb2.EchoRequest(message="pass it on"))
            assert_typed(passed.value, "echo")
