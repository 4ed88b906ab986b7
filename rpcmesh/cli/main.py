"""Entry point of the `rpcmesh` command and its one error boundary.

Every failure ends as one line on stderr and a non-zero exit: 2 for usage and
input problems (bad JSON, conflicting flags), 1 for errors from the control
plane (its status code and message), 1 for an unreachable control plane, 1 for
a server that cannot start (port in use, data folder locked or unwritable, a
damaged database, a bad policy or TLS file).

`rpcmesh up` and `rpcmesh gateway` stop on the first SIGINT or SIGTERM in order
and within a bounded time (see docs/operations.md); a second signal exits at once
(exit code 128 + the signal number).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from rpcmesh.cli import (
    bus_commands,
    certs_commands,
    event_commands,
    gateway_command,
    registry_commands,
    saga_commands,
)
from rpcmesh.cli.common import CliError, CommandFailed
from rpcmesh.cli.server_security import add_server_security_arguments, server_security_settings
from rpcmesh.cli.signals import run_until_signalled
from rpcmesh.controlplane.component import StartupError
from rpcmesh.controlplane.config import DEFAULT_COORDINATOR_NAME, ControlPlaneConfig, CoordinatorIdentity
from rpcmesh.errors import from_rpc_error

DEFAULT_HTTP_PORT = 8080
"""The HTTP API's and console's port unless --http-port or RPCMESH_HTTP_PORT says (and --port is not 0)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every rpcmesh command."""
    parser = argparse.ArgumentParser(
        prog="rpcmesh",
        description="rpcmesh: gRPC service mesh. Run the control plane and talk to it.",
    )
    parser.add_argument(
        "--version", action="version", version=f"rpcmesh {importlib.metadata.version('rpcmesh')}"
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("RPCMESH_LOG_LEVEL", "WARNING"),
        help="logging level (default WARNING)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="run the control plane",
        description="Run the rpcmesh control plane (Registry, Bus, SagaCoordinator, EventStore) in one "
        "process. Embedded SQLite by default; --store and --bus move it onto PostgreSQL and NATS JetStream.",
    )
    up.add_argument(
        "--host", default=os.environ.get("RPCMESH_HOST", "127.0.0.1"), help="interface (env RPCMESH_HOST)"
    )
    up.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("RPCMESH_PORT", "50051")),
        help="port; 0 picks a free one (env RPCMESH_PORT; default 50051)",
    )
    up.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("RPCMESH_DATA_DIR", ".rpcmesh")),
        help="folder of the SQLite files (env RPCMESH_DATA_DIR; default .rpcmesh)",
    )
    up.add_argument(
        "--store", default=os.environ.get("RPCMESH_STORE"), help="postgresql://... (env RPCMESH_STORE)"
    )
    up.add_argument(
        "--bus",
        default=os.environ.get("RPCMESH_BUS"),
        help="nats://... (several servers of one cluster: comma-separated; env RPCMESH_BUS)",
    )
    up.add_argument(
        "--bus-replicas",
        type=int,
        default=int(os.environ.get("RPCMESH_BUS_REPLICAS", "1")),
        help="replicas of each JetStream stream the Bus creates (env RPCMESH_BUS_REPLICAS; default 1)",
    )
    up.add_argument(
        "--bus-ping-interval",
        type=float,
        default=float(os.environ.get("RPCMESH_BUS_PING_INTERVAL", "5")),
        help="seconds between pings to the nats-server; two unanswered and another server is tried "
        "(env RPCMESH_BUS_PING_INTERVAL; default 5)",
    )
    up.add_argument(
        "--grace",
        type=float,
        default=float(os.environ.get("RPCMESH_GRACE", "5")),
        help="seconds unary calls get to finish on shutdown; open streams end at once "
        "(env RPCMESH_GRACE; default 5)",
    )
    up.add_argument(
        "--allow-address",
        action="append",
        metavar="CIDR|HOST-GLOB",
        help="the only instance addresses Register accepts (repeatable; default: any but link-local, "
        "unspecified, multicast, broadcast and cloud metadata addresses, which stay refused)",
    )
    up.add_argument(
        "--allow-link-local-addresses",
        action="store_true",
        help="accept link-local instance addresses (169.254.0.0/16, fe80::/10); "
        "metadata addresses stay refused",
    )
    up.add_argument(
        "--bus-max-topics",
        type=int,
        default=int(os.environ.get("RPCMESH_BUS_MAX_TOPICS", "10000")),
        help="most Bus topics; creating one more is RESOURCE_EXHAUSTED (env RPCMESH_BUS_MAX_TOPICS; "
        "default 10000)",
    )
    up.add_argument(
        "--bus-max-groups",
        type=int,
        default=int(os.environ.get("RPCMESH_BUS_MAX_GROUPS", "10000")),
        help="most consumer groups over all topics (env RPCMESH_BUS_MAX_GROUPS; default 10000)",
    )
    up.add_argument(
        "--http-port",
        type=int,
        default=int(os.environ["RPCMESH_HTTP_PORT"]) if os.environ.get("RPCMESH_HTTP_PORT") else None,
        help="port of the HTTP API (Connect protocol) and web console; 0 picks a free one, -1 turns "
        "it off (env RPCMESH_HTTP_PORT; default 8080, or a free port when --port is 0 or 8080 is "
        "taken; docs/http-api.md)",
    )
    up.add_argument(
        "--http-host",
        default=os.environ.get("RPCMESH_HTTP_HOST") or None,
        help="interface of the HTTP port (env RPCMESH_HTTP_HOST; default 127.0.0.1, whatever --host is)",
    )
    up.add_argument("--no-http", action="store_true", help="serve no HTTP API or console")
    add_server_security_arguments(up, with_policy=True)
    coordinator = up.add_argument_group(
        "saga coordinator identity",
        "who the coordinator inside `rpcmesh up` is when it calls the Registry and the participants; "
        "required with --tls-client-auth; it needs a policy entry (see docs/security.md)",
    )
    coordinator.add_argument(
        "--coordinator-cert",
        type=Path,
        default=os.environ.get("RPCMESH_COORDINATOR_CERT") or None,
        help="client certificate of the coordinator (mTLS; env RPCMESH_COORDINATOR_CERT)",
    )
    coordinator.add_argument(
        "--coordinator-key",
        type=Path,
        default=os.environ.get("RPCMESH_COORDINATOR_KEY") or None,
        help="key of --coordinator-cert (env RPCMESH_COORDINATOR_KEY)",
    )
    coordinator.add_argument(
        "--coordinator-token-file",
        type=Path,
        default=os.environ.get("RPCMESH_COORDINATOR_TOKEN_FILE") or None,
        help="file with the coordinator's bearer token (token mode; env RPCMESH_COORDINATOR_TOKEN_FILE; "
        "default: a token the control plane mints with --token-secret-file)",
    )
    coordinator.add_argument(
        "--coordinator-identity",
        default=os.environ.get("RPCMESH_COORDINATOR_IDENTITY") or DEFAULT_COORDINATOR_NAME,
        help="subject of the minted coordinator token "
        "(env RPCMESH_COORDINATOR_IDENTITY; default %(default)s)",
    )
    up.set_defaults(func=run_up)

    registry_commands.register(commands)
    bus_commands.register(commands)
    saga_commands.register(commands)
    event_commands.register(commands)
    certs_commands.register(commands)
    gateway_command.register(commands)
    return parser


def run_up(args: argparse.Namespace) -> int:
    """Run `rpcmesh up`."""
    try:
        coordinator = CoordinatorIdentity(
            cert_file=args.coordinator_cert,
            key_file=args.coordinator_key,
            token_file=args.coordinator_token_file,
            name=args.coordinator_identity,
        )
    except ValueError as exc:
        raise StartupError(str(exc)) from exc
    http_port: int | None = args.http_port
    fallback = http_port is None
    if http_port is None:
        http_port = 0 if args.port == 0 else DEFAULT_HTTP_PORT
    if args.no_http or http_port == -1:
        http_port = None
    try:
        config = ControlPlaneConfig(
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            store=args.store,
            bus=args.bus,
            bus_replicas=args.bus_replicas,
            bus_ping_interval=args.bus_ping_interval,
            grace=args.grace,
            allow_addresses=tuple(args.allow_address or ()),
            allow_link_local_addresses=args.allow_link_local_addresses,
            bus_max_topics=args.bus_max_topics,
            bus_max_groups=args.bus_max_groups,
            http_host=args.http_host or "127.0.0.1",
            http_port=http_port,
            http_port_fallback=fallback,
            security=server_security_settings(args, policy_file=args.policy),
            coordinator=coordinator,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    from rpcmesh.controlplane.saga.security import coordinator_client_security

    try:
        # Refuse before serving: a secure control plane whose coordinator has no identity
        # would accept sagas it can never run.
        coordinator_client_security(config)
    except ValueError as exc:
        raise StartupError(str(exc)) from exc
    from rpcmesh.controlplane.server import serve

    run_until_signalled(serve(config), deadline=config.grace + config.close_timeout + 5.0)
    print("rpcmesh control plane stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Run one rpcmesh command and exit with its status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from rpcmesh.telemetry import install_log_correlation

    # Every record then carries the request's correlation id (or "-" outside a request).
    install_log_correlation()
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(correlation_id)s]: %(message)s",
    )
    # "saga definitions show", "topics info": the command and its subcommands, outermost first.
    name = " ".join(
        [
            args.command,
            *(str(value) for key, value in vars(args).items() if key.endswith("_command") and value),
        ]
    )
    try:
        code = int(args.func(args))
    except CliError as exc:
        print(f"rpcmesh {name}: {exc}", file=sys.stderr)
        code = 2
    except (StartupError, CommandFailed) as exc:
        line = " ".join(str(exc).split())
        print(f"rpcmesh {name}: {line}", file=sys.stderr)
        code = 1
    except grpc.RpcError as exc:
        error = from_rpc_error(exc)
        if error.code is grpc.StatusCode.UNAVAILABLE:
            where = getattr(args, "target", "the control plane")
            print(
                f"rpcmesh {name}: cannot reach the control plane at {where} ({error.message})",
                file=sys.stderr,
            )
        else:
            print(f"rpcmesh {name}: {error.code.name}: {error.message}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        code = 0
    raise SystemExit(code)
