"""A ServiceHost for the wiring trace tests: answers Echo itself, or relays it through a Mesh.

    python chain_host.py --registry HOST:PORT --name svc-a [--downstream svc-b] [--fail-first N]

Telemetry comes from the ``OTEL_*`` variables (``ServiceHost.run`` sets it up). The
deepest handler answers with the correlation id it saw; every handler logs one line
whose format includes ``%(correlation_id)s``, so tests can read it in the output.
``--fail-first N`` answers the first N calls with UNAVAILABLE (a retry for the client).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import grpc
from echo.servicer import EchoServicer
from echo.v1 import echo_pb2, echo_pb2_grpc

from rpcmesh.client import Mesh, MeshPolicy, MethodPolicy, ServicePolicy
from rpcmesh.host import ServiceHost, ServiceHostConfig
from rpcmesh.telemetry import correlation_id, install_log_correlation

log = logging.getLogger("rpcmesh.tests.chain")


class ChainServicer(EchoServicer):
    """Echo that relays to ``downstream`` through the mesh, or answers with the correlation id."""

    def __init__(self, instance_id: str, registry: str, downstream: str, fail_first: int) -> None:
        super().__init__(instance_id)
        self.registry = registry
        self.downstream = downstream
        self.fail_first = fail_first
        self.calls = 0
        self.mesh: Mesh | None = None

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        self.calls += 1
        log.info("handling call %d", self.calls)
        if self.calls <= self.fail_first:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"failing call {self.calls} on purpose")
        if self.downstream:
            if self.mesh is None:
                policy = MeshPolicy(default=ServicePolicy(method=MethodPolicy(idempotent=True)))
                self.mesh = Mesh(self.registry, policy=policy)
            stub = echo_pb2_grpc.EchoStub(self.mesh.channel(self.downstream))
            reply = await stub.Echo(request, timeout=10)
            return echo_pb2.EchoResponse(message=reply.message, instance_id=self.instance_id)
        await self._behave(request.behaviour, context)
        return echo_pb2.EchoResponse(message=correlation_id() or "", instance_id=self.instance_id)


async def main() -> None:
    install_log_correlation()
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--downstream", default="")
    parser.add_argument("--fail-first", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(name)s correlation=%(correlation_id)s %(message)s",
    )
    host = ServiceHost(
        ServiceHostConfig(service=args.name, registry=args.registry, instance_id=f"{args.name}-1")
    )
    servicer = ChainServicer(f"{args.name}-1", args.registry, args.downstream, args.fail_first)
    host.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, servicer)
    try:
        await host.run()
    finally:
        if servicer.mesh is not None:
            await servicer.mesh.close()


if __name__ == "__main__":
    asyncio.run(main())
