"""`rpcmesh gateway`: one gRPC address that forwards every method to mesh services.

Security: the gateway's own port takes the same TLS/mTLS and token flags as
``rpcmesh up`` (``--tls-cert``/``--tls-key``/``--tls-ca``/``--tls-client-auth``,
``--token-secret-file``, ``--insecure``, or their ``RPCMESH_*`` variables); the
gateway reaches the Registry and the services with ``ClientSecurity.from_env()``
(``RPCMESH_TLS_CA``, ``RPCMESH_TLS_CLIENT_CERT``/``_KEY``, ``RPCMESH_TOKEN``...).
Telemetry comes from the ``OTEL_*`` variables.

Authorization: with authentication on, ``--access-policy FILE`` (control-plane
policy format; env ``RPCMESH_GATEWAY_ACCESS_POLICY``) says which identity may call
which ``service/Method`` through the gateway; without it every call is refused
unless ``--allow-any-identity`` (env ``RPCMESH_GATEWAY_ALLOW_ANY_IDENTITY``) is
given. ``--policy`` is something else: the mesh call policies (retries, timeouts,
breakers) of the forwarded calls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from rpcmesh.cli.common import CliError
from rpcmesh.cli.server_security import (
    add_server_security_arguments,
    env_flag,
    server_security_settings,
)
from rpcmesh.cli.signals import run_until_signalled


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
        "--route",
        action="append",
        default=[],
        help="GRPC_SERVICE=NAME or PACKAGE.*=NAME, or an HTTP path route /PATH=NAME (repeatable)",
    )
    gateway.add_argument(
        "--http-port",
        type=int,
        default=int(os.environ["RPCMESH_GATEWAY_HTTP_PORT"])
        if os.environ.get("RPCMESH_GATEWAY_HTTP_PORT")
        else None,
        help="also serve HTTP/JSON (Connect protocol) on this port of --host, 0 for a free one; "
        "off by default (env RPCMESH_GATEWAY_HTTP_PORT; docs/gateway-http.md)",
    )
    gateway.add_argument("--no-header-routing", action="store_true", help="ignore x-rpcmesh-service")
    gateway.add_argument("--policy", help="call policies (YAML or TOML) for the forwarded calls")
    gateway.add_argument("--grace", type=float, default=5.0, help="seconds to drain calls on shutdown")
    add_server_security_arguments(gateway, with_policy=False)
    access = gateway.add_argument_group(
        "authorization",
        "who may call what through the gateway (needs authentication: tokens or client certificates)",
    )
    access.add_argument(
        "--access-policy",
        type=Path,
        default=os.environ.get("RPCMESH_GATEWAY_ACCESS_POLICY") or None,
        help="YAML policy (control-plane format): an identity may call SERVICE/METHOD when its `calls` "
        "globs cover it (default: its `services`); admins may call everything "
        "(env RPCMESH_GATEWAY_ACCESS_POLICY)",
    )
    access.add_argument(
        "--allow-any-identity",
        action="store_true",
        default=env_flag("RPCMESH_GATEWAY_ALLOW_ANY_IDENTITY"),
        help="without --access-policy, let every authenticated identity call every service (the "
        "default refuses every call) (env RPCMESH_GATEWAY_ALLOW_ANY_IDENTITY)",
    )
    gateway.set_defaults(func=run_gateway)


def run_gateway(args: argparse.Namespace) -> int:
    """Run `rpcmesh gateway` until SIGINT/SIGTERM."""
    from rpcmesh.client import PolicyError, load_policy
    from rpcmesh.gateway import GatewayConfig, RouteTable
    from rpcmesh.gateway.routes import HttpRoutes, split_route_specs
    from rpcmesh.host.config import HOST_LIMITS
    from rpcmesh.security.client import ClientSecurity
    from rpcmesh.telemetry import TelemetryConfig

    registry = args.registry or [os.environ.get("RPCMESH_REGISTRY") or "127.0.0.1:50051"]
    try:
        grpc_routes, http_routes = split_route_specs(args.route)
        routes = RouteTable.parse(grpc_routes, allow_header=not args.no_header_routing)
        config = GatewayConfig(
            registry=registry,
            host=args.host,
            port=args.port,
            routes=routes,
            grace=args.grace,
            security=server_security_settings(args, policy_file=args.access_policy, limits=HOST_LIMITS),
            allow_any_identity=args.allow_any_identity,
            http_port=args.http_port,
            http_routes=HttpRoutes.parse(http_routes),
        )
        if http_routes and args.http_port is None:
            raise ValueError("--route /PATH=NAME: HTTP path routes need --http-port")
        policy = load_policy(args.policy) if args.policy else None
        client_security = ClientSecurity.from_env()
        telemetry_config = TelemetryConfig.from_env(
            None, **({} if os.environ.get("OTEL_SERVICE_NAME") else {"service_name": "rpcmesh-gateway"})
        )
    except (ValueError, PolicyError, OSError) as exc:
        raise CliError(str(exc)) from exc
    run_until_signalled(
        _serve(config, policy, client_security, telemetry_config), deadline=config.grace + 10.0
    )
    print("rpcmesh gateway stopped", flush=True)
    return 0


async def _serve(config: Any, policy: Any, client_security: Any, telemetry_config: Any) -> None:
    from rpcmesh.telemetry import install_log_correlation, setup_telemetry

    install_log_correlation()
    telemetry = setup_telemetry(telemetry_config)
    try:
        await _serve_gateway(config, policy, client_security)
    finally:
        await asyncio.to_thread(telemetry.shutdown)


async def _serve_gateway(config: Any, policy: Any, client_security: Any) -> None:
    from rpcmesh.client import Mesh
    from rpcmesh.gateway import Gateway

    async with Mesh(config.registry, policy=policy, security=client_security) as mesh:
        gateway = Gateway(config, mesh)
        try:
            address = await gateway.start()
            for line in gateway.warnings(address):
                print(line, file=sys.stderr, flush=True)
            print(f"rpcmesh gateway listening on {address}", flush=True)
            if gateway.http is not None:
                # Printed after the gRPC line: tools wait for the first 'listening on HOST:PORT'.
                print(f"rpcmesh gateway HTTP (Connect) ingress at {gateway.http.url}", flush=True)
            with contextlib.suppress(asyncio.CancelledError):
                await gateway.wait()
        finally:
            await asyncio.shield(gateway.stop())
