"""Echo service for the tracing tests: answers itself, or relays every call to a downstream Echo.

    python tests/integration/telemetry/relay_server.py [--downstream HOST:PORT]

Telemetry comes from the standard OTEL_* variables (``TelemetryConfig.from_env``). The
answer's ``message`` is the correlation id the deepest handler saw, so tests can check it
end to end. Prints ``listening on HOST:PORT``; flushes telemetry and exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
from echo.servicer import EchoServicer
from echo.v1 import echo_pb2, echo_pb2_grpc

from rpcmesh.errors import StatusErrorInterceptor
from rpcmesh.telemetry import (
    AioServerTracingInterceptor,
    TelemetryConfig,
    aio_client_interceptors,
    correlation_id,
    setup_telemetry,
)

log = logging.getLogger("rpcmesh.tests.relay")


class RelayServicer(EchoServicer):
    def __init__(self, instance_id: str, downstream: echo_pb2_grpc.EchoStub | None) -> None:
        super().__init__(instance_id)
        self.downstream = downstream

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        log.info("echo %s", request.message)
        if self.downstream is not None:
            reply = await self.downstream.Echo(request)
            return echo_pb2.EchoResponse(message=reply.message, instance_id=self.instance_id)
        await self._behave(request.behaviour, context)
        return echo_pb2.EchoResponse(message=correlation_id() or "", instance_id=self.instance_id)

    async def Expand(
        self, request: echo_pb2.ExpandRequest, context: Any
    ) -> AsyncIterator[echo_pb2.ExpandResponse]:
        if self.downstream is not None:
            async for reply in self.downstream.Expand(request):
                yield reply
            return
        await self._behave(request.behaviour, context)
        for _ in range(request.repeat):
            yield echo_pb2.ExpandResponse(message=correlation_id() or "", instance_id=self.instance_id)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--downstream", default="")
    parser.add_argument("--name", default="relay")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(correlation_id)s %(name)s %(message)s")
    telemetry = setup_telemetry(TelemetryConfig.from_env())
    channel = None
    stub = None
    if args.downstream:
        channel = grpc.aio.insecure_channel(
            args.downstream, interceptors=aio_client_interceptors(telemetry, target=args.downstream)
        )
        stub = echo_pb2_grpc.EchoStub(channel)
    server = grpc.aio.server(interceptors=[AioServerTracingInterceptor(telemetry), StatusErrorInterceptor()])
    echo_pb2_grpc.add_EchoServicer_to_server(RelayServicer(args.name, stub), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)
    if channel is not None:
        await channel.close()
    telemetry.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
