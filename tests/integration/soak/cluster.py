"""The soak's processes: control-plane nodes on fixed ports, restarted in place, and the shop's services.

Each node keeps the port it was first given (picked free at start) and its data
dir or database, so a restarted node is where every client and service expects
it. The shop's services are started once and never restarted: they must ride
over every restart of the control plane.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import ROOT, ManagedProcess, start_control_plane

SHOP_SERVICE = Path(__file__).with_name("shop_service.py")
SHOP_INSTANCES = (
    ("users", "users-1"),
    ("users", "users-2"),
    ("orders", "orders-1"),
    ("inventory", "inventory-1"),
    ("payments", "payments-1"),
)
SIGTERM_PATIENCE_S = 10.0
"""A node that has not exited this long after SIGTERM is hung (it is then killed and reported)."""
GRACE_S = 1.0
"""`rpcmesh up --grace`: seconds a stopping node drains its calls."""


@dataclass
class Restart:
    """One planned restart, and what happened when it ran."""

    index: int
    node: str
    kind: str
    """"term" (SIGTERM, graceful) or "kill" (kill -9)."""
    gap_s: float
    """Seconds of traffic between the previous node coming back and this stop."""
    down_s: float
    """Seconds the node stays down before it is started again."""
    at_s: float = 0.0
    """When it was stopped, in seconds since the traffic started."""
    in_flight: int = 0
    """Non-idempotent calls in flight at the stop."""
    stop_s: float = 0.0
    """Seconds the node took to exit."""
    hung: bool = False
    """SIGTERM did not end it within SIGTERM_PATIENCE_S."""
    exit_code: int | None = None
    back_s: float = 0.0
    """Seconds from the stop until the node listened again."""

    def describe(self) -> str:
        hung = " HUNG" if self.hung else ""
        return (
            f"#{self.index} {self.node} {self.kind} at {self.at_s:.2f}s (gap {self.gap_s:.2f}s, "
            f"down {self.down_s:.2f}s, exit {self.exit_code} in {self.stop_s:.2f}s{hung}, "
            f"back after {self.back_s:.2f}s, {self.in_flight} non-idempotent in flight)"
        )


def plan_restarts(
    rng: random.Random, *, mode: str, restarts: int, gap: tuple[float, float], down: tuple[float, float]
) -> list[Restart]:
    """The schedule: random moments; SIGTERM and kill -9 alternate; in scale-out the nodes alternate too."""
    first = rng.randrange(2)
    plan = []
    for index in range(restarts):
        if mode == "embedded":
            node, kind_index = "a", (first + index) % 2
        else:
            # a-term, b-kill, a-kill, b-term, ...: each node gets both kinds of stop.
            node, kind_index = "ab"[index % 2], (first + index + index // 2) % 2
        plan.append(
            Restart(
                index=index,
                node=node,
                kind=("term", "kill")[kind_index],
                gap_s=round(rng.uniform(*gap), 3),
                down_s=round(rng.uniform(*down), 3),
            )
        )
    return plan


@dataclass
class Node:
    """One `rpcmesh up` process, restartable on the port it first got."""

    name: str
    data_dir: Path
    extra: tuple[str, ...]
    port: int = 0
    proc: ManagedProcess | None = None
    logs: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        last: BaseException | None = None
        for _ in range(20):  # the port can take a moment to be free after a kill -9
            try:
                proc, address = start_control_plane(
                    self.data_dir, "--grace", str(GRACE_S), *self.extra, port=self.port
                )
            except (RuntimeError, TimeoutError) as exc:
                last = exc
                time.sleep(0.25)
                continue
            self.proc = proc
            self.port = int(address.rsplit(":", 1)[1])
            return
        raise RuntimeError(f"control plane {self.name} did not start on port {self.port}: {last}")

    def stop(self, kind: str, record: Restart) -> None:
        proc = self.proc
        assert proc is not None
        started = time.monotonic()
        if kind == "kill":
            proc.kill()
        else:
            proc.signal(signal.SIGTERM)
            try:
                proc.proc.wait(timeout=SIGTERM_PATIENCE_S)
            except subprocess.TimeoutExpired:
                record.hung = True
                proc.kill()
            proc.terminate()  # reaps and closes the pipe (a no-op signal-wise by now)
        record.stop_s = round(time.monotonic() - started, 3)
        record.exit_code = proc.proc.returncode
        self.logs.append(proc.output())
        self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.logs.append(self.proc.output())
            self.proc = None


class Shop:
    """The shop's service processes, each registered with every node."""

    def __init__(self, registries: Sequence[str], ttl: float) -> None:
        self.registries = list(registries)
        self.ttl = ttl
        self.processes: dict[str, ManagedProcess] = {}

    def start(self) -> None:
        flags = [arg for address in self.registries for arg in ("--registry", address)]
        for service, instance in SHOP_INSTANCES:
            proc = ManagedProcess(
                [
                    sys.executable,
                    str(SHOP_SERVICE),
                    service,
                    *flags,
                    "--instance-id",
                    instance,
                    "--ttl",
                    str(self.ttl),
                ],
                cwd=ROOT,
            )
            self.processes[instance] = proc
        for proc in self.processes.values():  # started together, waited for in turn
            proc.wait_for_address(timeout=30)

    def dead(self) -> list[str]:
        """Instances whose process exited (they were never meant to)."""
        return [name for name, proc in self.processes.items() if proc.proc.poll() is not None]

    def close(self) -> None:
        for proc in self.processes.values():  # all stop draining at once
            proc.signal(signal.SIGTERM)
        for proc in self.processes.values():
            proc.terminate(timeout=5)
