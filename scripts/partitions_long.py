"""The long partition schedule of issue 21: run it for --minutes and write the report (docs/partitions.md).

Usage (as root, from the repository root)::

    .venv/bin/python scripts/partitions_long.py --minutes 30 --seed 21 --out /tmp/partitions-run

It builds the namespace test bed (tests/partitions/bed.py), runs the workload in the client namespace,
and passes over every fault of tests/partitions/nemesis.py again and again in seeded orders until the
time is up; then it heals, lets the workload read everything back, checks every invariant and writes
the report: the faults run, the availability windows, the invariant results, the seed, the command and
the date. Exit status 0 when every invariant held, 1 when one did not, 2 when the bed cannot run here.
The history (every operation and fault, JSON lines) stays in --out for a closer look.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.partitions.bed import NATS_BINARY, NATS_SYNC_ALWAYS, postgres_bin, unsupported_reason  # noqa: E402
from tests.partitions.nemesis import FAULTS, HOLD, schedule  # noqa: E402
from tests.partitions.trial import TrialResult, run_trial  # noqa: E402


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "?"


def render(result: TrialResult, *, minutes: float, command: str, started: datetime.datetime) -> str:
    """The markdown report."""
    report = result.report
    faults = Counter(step.fault for step in result.steps_run)
    verdict = "every invariant held" if report.ok else f"{len(report.violations)} invariant violation(s)"
    settle = sorted(result.settle_times)
    lines = [
        "# Partition testing: the long schedule",
        "",
        "Written by `scripts/partitions_long.py` (issue 21); do not edit by hand, run it again.",
        "",
        f"**Result: {verdict}** over {result.seconds / 60:.1f} minutes of workload "
        f"({len(result.steps_run)} faults).",
        "",
        "| | |",
        "| --- | --- |",
        f"| command | `{command}` |",
        f"| seed | {result.seed} |",
        f"| started (UTC) | {started:%Y-%m-%d %H:%M} |",
        f"| minutes asked | {minutes:g} |",
        f"| machine | {platform.node()}, Linux {platform.release()}, {_cpus()} CPUs |",
        f"| NATS | {_version([NATS_BINARY, '--version'])}, 3 servers, streams with 3 replicas, "
        f"{'sync_interval always (fsync per write)' if NATS_SYNC_ALWAYS else 'default fsync (2 min)'} |",
        f"| PostgreSQL | {_version([f'{postgres_bin()}/postgres', '--version'])} (the bed's own instance) |",
        f"| delay/loss (`slow`) | {result.slow_note} |",
        "",
        "## The bed",
        "",
        "Every host in its own network namespace on one bridge: PostgreSQL, three nats-servers (JetStream",
        "cluster), three `rpcmesh up --store postgresql --bus nats --bus-replicas 3` nodes and the client",
        "namespace where `python -m tests.partitions.workload` runs service hosts renewing leases through",
        "a Mesh given all three nodes, Registry watchers, Bus publishers and a consumer group, EventStore",
        "appenders with expected revisions and an `$all` reader, and saga starters with their participants.",
        "",
        "## Faults",
        "",
        f"Each fault is held a random {HOLD[0]:g}-{HOLD[1]:g} s, healed, and the bed settles (every node",
        "answers grpc.health, JetStream has a meta leader) before the next one.",
        "",
        "| fault | what | times run |",
        "| --- | --- | --- |",
    ]
    lines.extend(f"| {fault} | {FAULT_TEXT[fault]} | {faults.get(fault, 0)} |" for fault in FAULTS)
    if settle:
        lines += [
            "",
            f"Time for the bed to settle after a heal: median {settle[len(settle) // 2]:.2f} s, "
            f"max {settle[-1]:.2f} s (a killed node or nats-server restarts in this time).",
        ]
    lines += ["", "## Results", "", report.summary().rstrip(), ""]
    lines += [
        "Availability: for each fault, the longest stretch without a successful operation of one kind",
        "(register, renew, append, publish, saga start) while the fault lasted, and how long after the",
        "heal the first success of a kind that had failed came. Operations go through a Mesh that knows",
        "all three nodes, so a fault on one node shows as the time the client takes to move off it.",
        "",
    ]
    return "\n".join(lines)


FAULT_TEXT = {
    "cut-pg": "a node and PostgreSQL cannot reach each other",
    "cut-nats": "a node and all three nats-servers cannot reach each other",
    "cut-clients": "a node and the client namespace cannot reach each other",
    "isolate": "a node cut from every other host",
    "one-way-pg": "what a node sends to PostgreSQL is dropped; the other way works",
    "slow": "delay and loss on a node's link, both directions",
    "kill-node": "kill -9 of a node, restarted at heal",
    "sigstop-node": "SIGSTOP of a node, SIGCONT at heal",
    "kill-nats": "kill -9 of one nats-server, restarted at heal",
    "sigstop-nats": "SIGSTOP of one nats-server, SIGCONT at heal",
}


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def main(argv: list[str] | None = None) -> int:
    """Run the long schedule and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the faults go on")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--out", type=Path, required=True, help="folder for the bed and the history")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "partitions.md")
    parser.add_argument("--kinds", default=None, help="the workload's --kinds (default: all)")
    args = parser.parse_args(argv)
    reason = unsupported_reason()
    if reason is not None:
        print(f"the partition test bed cannot run here: {reason}", file=sys.stderr)
        return 2
    # A SIGTERM ends the run like Ctrl-C: the bed removes its processes, namespaces and links.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    command = "scripts/partitions_long.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now(datetime.UTC)
    rounds = int(args.minutes * 60 / (len(FAULTS) * 4)) + 2
    steps = schedule(args.seed, rounds=rounds)
    until = time.monotonic() + args.minutes * 60

    def log(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

    result = run_trial(args.out, seed=args.seed, steps=steps, until=until, kinds=args.kinds, log=log)
    text = render(result, minutes=args.minutes, command=command, started=started)
    args.report.write_text(text, encoding="utf-8")
    print(text)
    print(f"report: {args.report}; history: {result.history}")
    return 0 if result.report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
