"""A ServiceHost for the end-to-end trace test: relays Echo to a downstream service, or publishes it.

    python service.py --registry HOST:PORT --name svc-a --downstream svc-b
    python service.py --registry HOST:PORT --name svc-b --topic TOPIC

Telemetry comes from the ``OTEL_*`` variables (``ServiceHost.run`` sets it up).
``--downstream``: the handler calls Echo on that service through a Mesh and answers
with its reply. Otherwise the handler publishes the request's message on ``--topic``
(on the Bus of the control plane at ``--registry``), unless the message starts with
``quiet``; a message containing ``fail-once`` is answered with UNAVAILABLE the first
time its ``x-idempotency-key`` is seen (a saga retry). The answer is the handler's
correlation id. Every handled call prints ``handled <name> <correlation id> <message>``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc
import grpc.aio
from echo.servicer import EchoServicer
from echo.v1 import echo_pb2, echo_pb2_grpc

from rpcmesh.bus import Publisher
from rpcmesh.client import Mesh, MeshPolicy, MethodPolicy, ServicePolicy
from rpcmesh.host import ServiceHost, ServiceHostConfig
from rpcmesh.telemetry import correlation_id


class E2eServicer(EchoServicer):
    """Echo that relays downstream or publishes on the Bus."""

    def __init__(self, name: str, registry: str, downstream: str, topic: str) -> None:
        super().__init__(f"{name}-1")
        self.name = name
        self.registry = registry
        self.downstream = downstream
        self.topic = topic
        self.mesh: Mesh | None = None
        self.bus_channel: grpc.aio.Channel | None = None
        self.publisher: Publisher | None = None
        self.failed_keys: set[str] = set()

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        print(f"handled {self.name} {correlation_id()} {request.message}", flush=True)
        key = metadata.get("x-idempotency-key", "")
        if "fail-once" in request.message and key not in self.failed_keys:
            self.failed_keys.add(key)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "failing the first attempt on purpose")
        if self.downstream:
            if self.mesh is None:
                policy = MeshPolicy(default=ServicePolicy(method=MethodPolicy(idempotent=True)))
                self.mesh = Mesh(self.registry, policy=policy)
            stub = echo_pb2_grpc.EchoStub(self.mesh.channel(self.downstream))
            reply = await stub.Echo(echo_pb2.EchoRequest(message=request.message), timeout=10)
            return echo_pb2.EchoResponse(message=reply.message, instance_id=self.instance_id)
        if self.topic and not request.message.startswith("quiet"):
            if self.publisher is None:
                # A plain channel: the publish stream is shared by every call, so it gets no
                # client span of its own; each message's PRODUCER span carries the trace.
                self.bus_channel = grpc.aio.insecure_channel(self.registry)
                self.publisher = Publisher(self.bus_channel)
            await self.publisher.publish(self.topic, request.message.encode())
        return echo_pb2.EchoResponse(message=correlation_id() or "", instance_id=self.instance_id)

    async def close(self) -> None:
        if self.mesh is not None:
            await self.mesh.close()
        if self.publisher is not None:
            await self.publisher.close()
        if self.bus_channel is not None:
            await self.bus_channel.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--downstream", default="")
    parser.add_argument("--topic", default="")
    args = parser.parse_args()
    host = ServiceHost(
        ServiceHostConfig(service=args.name, registry=args.registry, instance_id=f"{args.name}-1")
    )
    servicer = E2eServicer(args.name, args.registry, args.downstream, args.topic)
    host.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, servicer)
    try:
        await host.run()
    finally:
        await servicer.close()


if __name__ == "__main__":
    asyncio.run(main())
