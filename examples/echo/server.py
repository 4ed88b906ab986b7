"""Run the Echo service on a ServiceHost, registered with the Registry.

    python examples/echo/server.py --registry 127.0.0.1:50051 [--name echo] [--instance-id ID] [--port 0]

Prints ``listening on HOST:PORT`` once serving and exits cleanly on SIGTERM (a second
signal exits at once). A start-up problem (port in use, bad TLS files) is one line on
stderr and exit code 1.

Security from the environment: its own port from ``RPCMESH_TLS_CERT``/``_KEY``/``_CA``/
``_CLIENT_AUTH`` and ``RPCMESH_TOKEN_SECRET_FILE``; the Registry is reached with
``RPCMESH_TLS_CA``, ``RPCMESH_TLS_CLIENT_CERT``/``_KEY`` and ``RPCMESH_TOKEN`` (its identity).
Telemetry from the ``OTEL_*`` variables.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import uuid
from pathlib import Path

import grpc
import grpc.aio

if __package__ in (None, ""):
    # Run as a script: make `echo.v1` and `echo.servicer` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echo.servicer import EchoServicer
from echo.v1 import echo_pb2, echo_pb2_grpc
from rpcmesh.host import ServiceHost, ServiceHostConfig, StartupError, host_security_from_env


class SlowEchoServicer(EchoServicer):
    """An Echo instance that answers unary calls late, to show hedging against a slow instance."""

    def __init__(self, instance_id: str, delay_ms: int) -> None:
        super().__init__(instance_id)
        self.delay = delay_ms / 1000

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext
    ) -> echo_pb2.EchoResponse:
        await asyncio.sleep(self.delay)
        return await super().Echo(request, context)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Echo service on an rpcmesh ServiceHost.")
    parser.add_argument("--registry", required=True, action="append", help="Registry host:port (repeatable)")
    parser.add_argument("--name", default="echo", help="service name to register (default echo)")
    parser.add_argument("--instance-id", default="", help="instance id (default: a random one)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    parser.add_argument("--ttl", type=float, default=10.0, help="lease TTL in seconds")
    parser.add_argument("--zone", default="", help="zone to register")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds to drain calls on shutdown")
    parser.add_argument(
        "--delay-ms", type=int, default=0, help="extra latency of every call (a slow instance)"
    )
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


async def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    instance_id = args.instance_id or f"{args.name}-{uuid.uuid4().hex[:8]}"
    config = ServiceHostConfig(
        service=args.name,
        registry=args.registry,
        instance_id=instance_id,
        host=args.host,
        port=args.port,
        ttl=args.ttl,
        zone=args.zone,
        grace=args.grace,
        security=host_security_from_env(),
    )
    host = ServiceHost(config)
    servicer = SlowEchoServicer(instance_id, args.delay_ms) if args.delay_ms else EchoServicer(instance_id)
    host.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, servicer)
    await host.run()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except StartupError as exc:
        print(f"echo: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    print("echo stopped", flush=True)
