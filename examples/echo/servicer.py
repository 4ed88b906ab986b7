"""EchoServicer: answers in all four RPC shapes and misbehaves on request (delay, failure)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from echo.v1 import echo_pb2, echo_pb2_grpc


class EchoServicer(echo_pb2_grpc.EchoServicer):
    """Echo service; every answer says which instance served it."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.served = 0

    async def _behave(self, behaviour: echo_pb2.Behaviour, context: grpc.aio.ServicerContext) -> None:
        self.served += 1
        if behaviour.delay_ms:
            await asyncio.sleep(behaviour.delay_ms / 1000)
        if behaviour.fail_code:
            code = next(c for c in grpc.StatusCode if c.value[0] == behaviour.fail_code)
            await context.abort(code, f"asked to fail with {code.name} by {self.instance_id}")

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext
    ) -> echo_pb2.EchoResponse:
        await self._behave(request.behaviour, context)
        # The caller's own x-* metadata comes back as trailers, so a proxy can be checked for passing it on.
        echoed = [(f"echoed-{k}", v) for k, v in context.invocation_metadata() or () if k.startswith("x-")]
        context.set_trailing_metadata(tuple(echoed))
        return echo_pb2.EchoResponse(
            message=request.message, instance_id=self.instance_id, served=self.served
        )

    async def Expand(
        self, request: echo_pb2.ExpandRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[echo_pb2.ExpandResponse]:
        await self._behave(request.behaviour, context)
        for _ in range(request.repeat):
            yield echo_pb2.ExpandResponse(message=request.message, instance_id=self.instance_id)

    async def Collect(
        self, request_iterator: AsyncIterator[echo_pb2.CollectRequest], context: grpc.aio.ServicerContext
    ) -> echo_pb2.CollectResponse:
        self.served += 1
        parts = [request.message async for request in request_iterator]
        return echo_pb2.CollectResponse(message=" ".join(parts), instance_id=self.instance_id)

    async def Chat(
        self, request_iterator: AsyncIterator[echo_pb2.ChatRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[echo_pb2.ChatResponse]:
        self.served += 1
        async for request in request_iterator:
            yield echo_pb2.ChatResponse(message=request.message, instance_id=self.instance_id)
