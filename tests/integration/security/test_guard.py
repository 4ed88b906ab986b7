"""guard_server: the checks applied at registration, on real grpc.aio servers without interceptors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rpcmesh.errors import NotFoundError
from rpcmesh.security.guard import ANONYMOUS, CallGuard, current_identity, guard_server
from rpcmesh.security.identity import AUTHORIZATION_KEY, Authenticator
from rpcmesh.security.limits import Limits
from rpcmesh.security.policy import Policy
from rpcmesh.security.tokens import mint_token

SECRET = b"0123456789abcdef0123456789abcdef-guard"
TIMEOUT = 10.0


class HoldingEcho(echo_pb2_grpc.EchoServicer):
    """Echo answers with the caller's identity; "hold" waits until released; "missing" raises NOT_FOUND."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = 0

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext
    ) -> echo_pb2.EchoResponse:
        if request.message == "hold":
            self.holding += 1
            await self.release.wait()
        if request.message == "missing":
            raise NotFoundError("no such thing")
        identity = current_identity.get()
        return echo_pb2.EchoResponse(message=identity.name if identity else "none")

    async def Chat(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for request in request_iterator:
            yield echo_pb2.ChatResponse(message=request.message)
        raise NotFoundError("chat over")


async def _serve(guard: CallGuard, servicer: HoldingEcho) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    guarded = guard_server(server, guard)
    echo_pb2_grpc.add_EchoServicer_to_server(servicer, guarded)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), guarded)
    port = guarded.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def open_server() -> AsyncIterator[tuple[CallGuard, HoldingEcho, str]]:
    guard = CallGuard(
        authenticator=Authenticator(),
        policy=Policy(allow_all=True),
        limits=Limits(max_calls_per_connection=3),
    )
    servicer = HoldingEcho()
    server, address = await _serve(guard, servicer)
    try:
        yield guard, servicer, address
    finally:
        servicer.release.set()
        await server.stop(None)


async def test_open_guard_caps_calls_per_connection_and_maps_errors(
    open_server: tuple[CallGuard, HoldingEcho, str],
) -> None:
    guard, servicer, address = open_server
    async with grpc.aio.insecure_channel(address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        assert (
            await stub.Echo(echo_pb2.EchoRequest(message="hi"), timeout=TIMEOUT)
        ).message == ANONYMOUS.name
        held = [stub.Echo(echo_pb2.EchoRequest(message="hold"), timeout=TIMEOUT) for _ in range(3)]
        for _ in range(100):
            if servicer.holding == 3:
                break
            await asyncio.sleep(0.05)
        assert guard.tracker.in_flight() == 3
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=TIMEOUT)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # Health is public: not counted, never refused.
        health_stub = health_pb2_grpc.HealthStub(channel)
        reply = await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        servicer.release.set()
        assert [reply.message for reply in await asyncio.gather(*held)] == [ANONYMOUS.name] * 3
        assert guard.tracker.in_flight() == 0
        # StatusErrors map to their status in the same wrapper, in both shapes; slots are released.
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Echo(echo_pb2.EchoRequest(message="missing"), timeout=TIMEOUT)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND

        async def chat() -> AsyncIterator[echo_pb2.ChatRequest]:
            yield echo_pb2.ChatRequest(message="a")

        replies = []
        with pytest.raises(grpc.aio.AioRpcError) as over:
            async for reply in stub.Chat(chat(), timeout=TIMEOUT):
                replies.append(reply.message)
        assert replies == ["a"] and over.value.code() is grpc.StatusCode.NOT_FOUND
        assert guard.tracker.in_flight() == 0


async def test_authenticated_guard_refuses_missing_and_bad_tokens() -> None:
    guard = CallGuard(authenticator=Authenticator(token_secret=SECRET), policy=None, limits=Limits())
    servicer = HoldingEcho()
    server, address = await _serve(guard, servicer)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.Echo(echo_pb2.EchoRequest(message="hi"), timeout=TIMEOUT)
            assert missing.value.code() is grpc.StatusCode.UNAUTHENTICATED
            bad = ((AUTHORIZATION_KEY, "Bearer not-a-token"),)
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await stub.Echo(echo_pb2.EchoRequest(message="hi"), metadata=bad, timeout=TIMEOUT)
            assert invalid.value.code() is grpc.StatusCode.UNAUTHENTICATED
            token = mint_token(SECRET, subject="billing", issuer="rpcmesh", ttl=60)
            good = ((AUTHORIZATION_KEY, f"Bearer {token}"),)
            reply = await stub.Echo(echo_pb2.EchoRequest(message="hi"), metadata=good, timeout=TIMEOUT)
            assert reply.message == "billing"
            with pytest.raises(grpc.aio.AioRpcError) as not_found:
                await stub.Echo(echo_pb2.EchoRequest(message="missing"), metadata=good, timeout=TIMEOUT)
            assert not_found.value.code() is grpc.StatusCode.NOT_FOUND
            # Health answers without credentials.
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert guard.tracker.in_flight() == 0
    finally:
        await server.stop(None)
