"""`rpcmesh gateway`: one gRPC address that forwards every method to mesh services."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from typing import Any

from rpcmesh.cli.common import CliError


def register(commands: Any) -> None:
    """Add `rpcmesh gateway` to the CLI."""
    gateway = commands.add_parser(
        "gateway",
        help="run the gRPC gateway",
        description="Accept any gRPC method and forward it to the registered service it routes to, "
        "through the mesh client stack (discovery, load balancing, retries, breakers). A gRPC service "
        "maps to the service named by --route, else the caller's x-rpcmesh-service header, else its "
        "lowercased simple name (shop.v1.Orders -> orders).",
    )
    gateway.add_argument(
        "--registry",
        "--target",
        dest="registry",
        action="append",
        help="Registry host:port, repeatable (env RPCMESH_REGISTRY; default 127.0.0.1:50051)",
    )
    gateway.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    gateway.add_argument("--port", type=int, default=int(os.environ.get("RPCMESH_GATEWAY_PORT", "0")))
    gateway.add_argument(
        "--route", action="append", default=[], help="GRPC_SERVICE=NAME or PACKAGE.*=NAME (repeatable)"
    )
    gateway.add_argument("--no-header-routing", action="store_true", help="ignore x-rpcmesh-service")
    gateway.add_argument("--policy", help="call policies (YAML or TOML) for the forwarded calls")
    gateway.add_argument("--grace", type=float, default=5.0, help="seconds to drain calls on shutdown")
    gateway.set_defaults(func=run_gateway)


def run_gateway(args: argparse.Namespace) -> int:
    """Run `rpcmesh gateway` until SIGINT/SIGTERM."""
    from rpcmesh.client import PolicyError, load_policy
    from rpcmesh.gateway import GatewayConfig, RouteTable

    registry = args.registry or [os.environ.get("RPCMESH_REGISTRY") or "127.0.0.1:50051"]
    try:
        routes = RouteTable.parse(args.route, allow_header=not args.no_header_routing)
        config = GatewayConfig(
            registry=registry, host=args.host, port=args.port, routes=routes, grace=args.grace
        )
        policy = load_policy(args.policy) if args.policy else None
    except (ValueError, PolicyError, OSError) as exc:
        raise CliError(str(exc)) from exc
    asyncio.run(_serve(config, policy))
    print("rpcmesh gateway stopped", flush=True)
    return 0


async def _serve(config: Any, policy: Any) -> None:
    from rpcmesh.client import Mesh
    from rpcmesh.gateway import Gateway

    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    async with Mesh(config.registry, policy=policy) as mesh:
        gateway = Gateway(config, mesh)
        try:
            address = await gateway.start()
            print(f"rpcmesh gateway listening on {address}", flush=True)
            with contextlib.suppress(asyncio.CancelledError):
                await gateway.wait()
        finally:
            await asyncio.shield(gateway.stop())
