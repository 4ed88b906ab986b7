"""The nemesis of the partition tests: a seeded schedule of network and process faults on a :class:`Bed`.

Each step injects one fault, holds it a random 2-8 s, heals it and lets the bed settle (every node
answers grpc.health, every nats-server runs and JetStream has a meta leader). The faults (issue 21):

* ``cut-pg``: a node and PostgreSQL cannot reach each other;
* ``cut-nats``: a node and all three nats-servers;
* ``cut-clients``: a node and the client namespace (the workload, its services and participants);
* ``isolate``: a node and every other host;
* ``one-way-pg``: what a node sends to PostgreSQL is dropped, what PostgreSQL sends arrives;
* ``slow``: delay and loss on a node's link (netem, or a tbf rate limit where the kernel has no netem);
* ``kill-node`` / ``sigstop-node``: kill -9 (then restart) or SIGSTOP (then SIGCONT) a node;
* ``kill-nats`` / ``sigstop-nats``: the same for one nats-server.

Every fault and heal is recorded in ``nemesis.jsonl`` in the history format
(:mod:`tests.partitions.history`): proc ``nemesis``, op ``fault``/``heal``, args ``fault``, ``target``
(the host name) and ``ip`` (the node addresses it concerns, for the checkers).
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.partitions.bed import HOST_OCTETS, NATS, NODE_PORT, NODES, Bed
from tests.partitions.history import FAIL, OK, HistoryWriter

FAULTS = (
    "cut-pg",
    "cut-nats",
    "cut-clients",
    "isolate",
    "one-way-pg",
    "slow",
    "kill-node",
    "sigstop-node",
    "kill-nats",
    "sigstop-nats",
)
NATS_FAULTS = frozenset({"kill-nats", "sigstop-nats"})
"""Faults whose target is a nats-server (the others target a node)."""
HOLD = (2.0, 8.0)
SETTLE_PAUSE = 1.0
"""Seconds the bed runs fault-free after it has settled, before the next fault."""


@dataclass(frozen=True)
class Step:
    """One fault of a schedule."""

    fault: str
    target: str
    hold: float


def schedule(seed: int, *, rounds: int = 1, faults: tuple[str, ...] = FAULTS) -> list[Step]:
    """``rounds`` passes over ``faults``, each pass in a seeded order with seeded targets and holds."""
    rng = random.Random(seed)
    steps = []
    for _ in range(rounds):
        order = list(faults)
        rng.shuffle(order)
        for fault in order:
            target = rng.choice(NATS if fault in NATS_FAULTS else NODES)
            steps.append(Step(fault, target, round(rng.uniform(*HOLD), 2)))
    return steps


class Nemesis:
    """Runs a schedule on a bed and records it."""

    def __init__(self, bed: Bed, out: Path, *, log: Callable[[str], None] | None = None) -> None:
        self.bed = bed
        self.writer = HistoryWriter(out / "nemesis.jsonl")
        self.log = log or bed.log
        self.stop = threading.Event()
        """Set to end the schedule early (the current fault is healed)."""
        self.settle_times: list[float] = []
        self.done = 0
        """Steps run to the end (healed and settled)."""

    def _args(self, step: Step) -> dict[str, str]:
        ip = self.bed.ip(step.target) if step.target in NODES else ""
        return {"fault": step.fault, "target": step.target, "ip": ip}

    def inject(self, step: Step) -> str:
        """Apply ``step``'s fault; returns a note on how (the qdisc of ``slow``)."""
        bed, node = self.bed, step.target
        note = ""
        if step.fault == "cut-pg":
            self._cut(node, ["pg"])
        elif step.fault == "cut-nats":
            self._cut(node, list(NATS))
        elif step.fault == "cut-clients":
            self._cut(node, ["client"])
        elif step.fault == "isolate":
            self._cut(node, [host for host in HOST_OCTETS if host != node])
        elif step.fault == "one-way-pg":
            bed.block(node, "pg")
        elif step.fault == "slow":
            note = bed.slow(node)
        elif step.fault in ("kill-node", "kill-nats"):
            bed.kill(node)
        elif step.fault in ("sigstop-node", "sigstop-nats"):
            bed.signal(node, signal.SIGSTOP)
        else:
            raise ValueError(f"unknown fault {step.fault!r}")
        return note

    def _cut(self, node: str, others: list[str]) -> None:
        for other in others:
            self.bed.block(node, other)
            self.bed.block(other, node)

    def heal(self, step: Step) -> None:
        """Undo ``step``'s fault (restart a killed process)."""
        bed, node = self.bed, step.target
        for src, dst in list(bed.blocked):
            if node in (src, dst):
                bed.unblock(src, dst)
        bed.unslow(node)
        if node in bed.paused:
            bed.signal(node, signal.SIGCONT)
        if not bed.alive(node):
            bed.restart(node)

    def settle(self, timeout: float = 90.0) -> float:
        """Wait until every node answers grpc.health and NATS has a meta leader; returns the seconds."""
        started = time.monotonic()
        deadline = started + timeout
        pending = set(NODES)
        while pending or not self._jetstream_ready():
            for node in sorted(pending):
                if _serving(f"{self.bed.ip(node)}:{NODE_PORT}"):
                    pending.discard(node)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the bed did not settle in {timeout:.0f}s (not serving: {sorted(pending)})"
                )
            if pending:
                time.sleep(0.25)
        return time.monotonic() - started

    def _jetstream_ready(self) -> bool:
        for name in NATS:
            if not self.bed.alive(name):
                return False
        with contextlib.suppress(OSError, ValueError):
            meta = self.bed.jsz(NATS[0]).get("meta_cluster")
            return isinstance(meta, dict) and bool(meta.get("leader"))
        return False

    def step(self, step: Step) -> None:
        """Inject, hold, heal, settle; every fault and heal is recorded."""
        args = self._args(step)
        invoke = time.monotonic()
        try:
            note = self.inject(step)
        except Exception as exc:
            self.writer.record("nemesis", "fault", invoke, outcome=FAIL, args=args, error=f"UNKNOWN: {exc}")
            raise
        self.writer.record("nemesis", "fault", invoke, args=args, result={"note": note} if note else {})
        self.log(f"nemesis: {step.fault} {step.target} for {step.hold:.1f}s")
        self.stop.wait(step.hold)
        invoke = time.monotonic()
        try:
            self.heal(step)
            settled = self.settle()
        except Exception as exc:
            self.writer.record("nemesis", "heal", invoke, outcome=FAIL, args=args, error=f"UNKNOWN: {exc}")
            raise
        self.settle_times.append(settled)
        self.writer.record(
            "nemesis", "heal", invoke, outcome=OK, args=args, result={"settle": round(settled, 3)}
        )
        self.stop.wait(SETTLE_PAUSE)

    def run(self, steps: list[Step], *, until: float | None = None) -> int:
        """Run ``steps`` until :attr:`stop` is set or monotonic time ``until``; returns how many ran."""
        try:
            for step in steps:
                if self.stop.is_set() or (until is not None and time.monotonic() + step.hold > until):
                    break
                self.step(step)
                self.done += 1
        finally:
            self.heal_all()
        return self.done

    def heal_all(self) -> None:
        """Heal everything still faulted and record one heal for every target."""
        invoke = time.monotonic()
        self.bed.heal_all()
        self.writer.record("nemesis", "heal", invoke, args={"fault": "all", "target": ""})

    def close(self) -> None:
        """Close the history file."""
        self.writer.close()


def _serving(address: str, timeout: float = 2.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
