"""The rolling-restart soak, long version: the example shop under traffic while the control plane restarts.

    .venv/bin/python scripts/soak.py --mode embedded --restarts 50 --seed 7
    .venv/bin/python scripts/soak.py --mode scale-out --restarts 50      # PostgreSQL + NATS JetStream

The same harness as the compact test in ``make test``
(``tests/integration/soak/``), with more restarts and, by default, longer gaps. Scale-out
runs on a fresh PostgreSQL database (dropped afterwards) and the NATS server of
``RPCMESH_TEST_PGHOST``/``RPCMESH_TEST_NATS`` (see ``tests/support/backends.py``). Prints one
JSON line at the end (parameters, figures, violations, the schedule) and exits 1 when an
invariant is broken.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from tests.integration.soak.harness import SoakConfig, run_soak  # noqa: E402
from tests.support import backends  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Rolling-restart soak of the example shop.")
    parser.add_argument("--mode", choices=("embedded", "scale-out"), default="embedded")
    parser.add_argument("--seed", type=int, default=None, help="schedule seed (random when omitted)")
    parser.add_argument("--restarts", type=int, default=50)
    parser.add_argument("--gap", type=float, nargs=2, default=(2.0, 6.0), metavar=("MIN", "MAX"))
    parser.add_argument("--down", type=float, nargs=2, default=(0.0, 1.0), metavar=("MIN", "MAX"))
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--ttl", type=float, default=5.0)
    return parser.parse_args(argv)


def soak_config(args: argparse.Namespace, seed: int, store: str | None, bus: str | None) -> SoakConfig:
    return SoakConfig(
        mode=args.mode,
        seed=seed,
        restarts=args.restarts,
        gap=(args.gap[0], args.gap[1]),
        down=(args.down[0], args.down[1]),
        settle_s=args.settle,
        ttl=args.ttl,
        store=store,
        bus=bus,
    )


async def soak(args: argparse.Namespace) -> dict[str, object]:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    if args.mode == "embedded":
        return (await run_soak(soak_config(args, seed, None, None))).summary()
    bus = backends.nats_url()
    with backends.fresh_postgres_database() as store:
        return (await run_soak(soak_config(args, seed, store, bus))).summary()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    summary = asyncio.run(soak(args))
    summary["wall_s"] = round(time.monotonic() - began, 1)
    print(json.dumps(summary, sort_keys=False), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
