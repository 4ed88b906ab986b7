"""Entry point of the `rpcmesh` command and its one error boundary.

Every failure ends as one line on stderr and a non-zero exit: 2 for usage and
input problems (bad JSON, conflicting flags), 1 for errors from the control
plane (its status code and message), 1 for an unreachable control plane.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
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
from rpcmesh.cli.common import CliError
from rpcmesh.cli.server_security import add_server_security_arguments, server_security_settings
from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.errors import from_rpc_error


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every rpcmesh command."""
    parser = argparse.ArgumentParser(
        prog="rpcmesh",
        description="rpcmesh: gRPC service mesh. Run the control plane and talk to it.",
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
    up.add_argument("--bus", default=os.environ.get("RPCMESH_BUS"), help="nats://... (env RPCMESH_BUS)")
    up.add_argument("--grace", type=float, default=5.0, help="seconds to drain calls on shutdown")
    add_server_security_arguments(up, with_policy=True)
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
        config = ControlPlaneConfig(
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            store=args.store,
            bus=args.bus,
            grace=args.grace,
            security=server_security_settings(args, policy_file=args.policy),
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    asyncio.run(_serve_until_signalled(config))
    print("rpcmesh control plane stopped", flush=True)
    return 0


async def _serve_until_signalled(config: ControlPlaneConfig) -> None:
    from rpcmesh.controlplane.server import serve

    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serve(config)


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
    name = args.command + (
        f" {getattr(args, 'saga_command', '') or getattr(args, 'events_command', '')}".rstrip()
    )
    try:
        code = int(args.func(args))
    except CliError as exc:
        print(f"rpcmesh {name}: {exc}", file=sys.stderr)
        code = 2
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
