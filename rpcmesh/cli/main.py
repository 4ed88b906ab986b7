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
from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.errors import from_rpc_error
from rpcmesh.security.settings import SecuritySettings
from rpcmesh.security.tls import ServerTlsConfig


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
    _add_security_arguments(up)
    up.set_defaults(func=run_up)

    registry_commands.register(commands)
    bus_commands.register(commands)
    saga_commands.register(commands)
    event_commands.register(commands)
    certs_commands.register(commands)
    gateway_command.register(commands)
    return parser


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _add_security_arguments(up: argparse.ArgumentParser) -> None:
    env = os.environ.get
    group = up.add_argument_group(
        "security", "TLS, mTLS, identities and authorization (`rpcmesh certs` makes development certificates)"
    )
    group.add_argument(
        "--tls-cert",
        type=Path,
        default=env("RPCMESH_TLS_CERT"),
        help="server certificate (env RPCMESH_TLS_CERT)",
    )
    group.add_argument(
        "--tls-key", type=Path, default=env("RPCMESH_TLS_KEY"), help="server key (env RPCMESH_TLS_KEY)"
    )
    group.add_argument(
        "--tls-ca",
        type=Path,
        default=env("RPCMESH_TLS_CA"),
        help="CA that client certificates chain to (env RPCMESH_TLS_CA)",
    )
    group.add_argument(
        "--tls-client-auth",
        action="store_true",
        default=_env_flag("RPCMESH_TLS_CLIENT_AUTH"),
        help="require client certificates (mTLS); their name is the identity (env RPCMESH_TLS_CLIENT_AUTH)",
    )
    group.add_argument(
        "--token-secret-file",
        type=Path,
        default=env("RPCMESH_TOKEN_SECRET_FILE"),
        help="HS256 secret of bearer tokens (env RPCMESH_TOKEN_SECRET_FILE)",
    )
    group.add_argument(
        "--token-issuer",
        default=env("RPCMESH_TOKEN_ISSUER") or "rpcmesh",
        help="issuer tokens must name (env RPCMESH_TOKEN_ISSUER)",
    )
    group.add_argument(
        "--policy",
        type=Path,
        default=env("RPCMESH_POLICY_FILE"),
        help="YAML policy file (env RPCMESH_POLICY_FILE)",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=_env_flag("RPCMESH_INSECURE"),
        help="development mode: accept bearer tokens over plaintext (env RPCMESH_INSECURE)",
    )


def _security_settings(args: argparse.Namespace) -> SecuritySettings:
    tls = None
    if args.tls_cert is not None or args.tls_key is not None:
        if args.tls_cert is None or args.tls_key is None:
            raise ValueError("--tls-cert and --tls-key: give both or neither")
        tls = ServerTlsConfig(
            cert_file=args.tls_cert,
            key_file=args.tls_key,
            ca_file=args.tls_ca,
            client_auth=args.tls_client_auth,
        )
    elif args.tls_client_auth:
        raise ValueError("--tls-client-auth: needs --tls-cert and --tls-key")
    return SecuritySettings(
        tls=tls,
        token_secret_file=args.token_secret_file,
        token_issuer=args.token_issuer,
        policy_file=args.policy,
        insecure=args.insecure,
    )


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
            security=_security_settings(args),
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
