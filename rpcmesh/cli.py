"""The `rpcmesh` command line: `rpcmesh up` runs the control plane."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from rpcmesh.controlplane.config import ControlPlaneConfig


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every rpcmesh command."""
    parser = argparse.ArgumentParser(prog="rpcmesh", description="gRPC service mesh for Python and beyond.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="run the control plane (Registry and the other services) in one process",
        description="Run the rpcmesh control plane. Embedded SQLite by default; "
        "--store and --bus move it onto PostgreSQL and NATS JetStream.",
    )
    up.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    up.add_argument(
        "--port", type=int, default=50051, help="port to listen on; 0 picks a free one (default 50051)"
    )
    up.add_argument("--data-dir", type=Path, default=Path(".rpcmesh"), help="folder of the SQLite files")
    up.add_argument("--store", default=None, help="postgresql://... to keep state in PostgreSQL")
    up.add_argument("--bus", default=None, help="nats://... to run the Bus on NATS JetStream")
    up.add_argument("--grace", type=float, default=5.0, help="seconds to drain calls on shutdown")
    return parser


async def _run_up(config: ControlPlaneConfig) -> None:
    from rpcmesh.controlplane.server import serve

    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serve(config)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `rpcmesh` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "up":
        try:
            config = ControlPlaneConfig(
                host=args.host,
                port=args.port,
                data_dir=args.data_dir,
                store=args.store,
                bus=args.bus,
                grace=args.grace,
            )
        except ValueError as exc:
            print(f"rpcmesh up: {exc}", file=sys.stderr)
            raise SystemExit(2) from exc
        asyncio.run(_run_up(config))
        print("rpcmesh control plane stopped", flush=True)
