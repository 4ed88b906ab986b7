"""One partition trial: a bed, the workload in the client namespace, the nemesis's schedule, the checks.

Used by ``tests/partitions/test_compact.py`` (a short seeded schedule) and ``scripts/partitions_long.py``
(a long one). Order: build the bed and verify it, start ``python -m tests.partitions.workload`` inside
the client namespace, let it warm up, run the schedule, heal everything, let the workload run fault-free
for ``tail`` seconds, SIGTERM it (it then runs its final read phase and writes ``final.json``), stop the
bed, and run :func:`tests.partitions.checks.check_all` on the history folder.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.partitions.bed import Bed
from tests.partitions.checks import Report, check_all
from tests.partitions.nemesis import Nemesis, Step
from tests.support.processes import ROOT, ManagedProcess, python_env

WORKLOAD_MODULE = "tests.partitions.workload"


@dataclass
class TrialResult:
    """What a trial ran and found."""

    seed: int
    history: Path
    report: Report
    steps_run: list[Step] = field(default_factory=list)
    started: float = 0.0
    """Monotonic time the workload started."""
    ended: float = 0.0
    settle_times: list[float] = field(default_factory=list)
    workload_exit: int | None = None
    workload_output: str = ""
    errors: list[str] = field(default_factory=list)
    """Faults the bed did not recover from (the node or NATS did not come back in time)."""
    slow_note: str = ""
    """How ``slow`` was applied (netem, or the tbf fallback)."""

    @property
    def seconds(self) -> float:
        """Seconds from the workload's start to its end."""
        return self.ended - self.started


def run_trial(
    workdir: Path,
    *,
    seed: int,
    steps: list[Step],
    until: float | None = None,
    warmup: float = 4.0,
    tail: float = 4.0,
    final_timeout: float = 120.0,
    kinds: str | None = None,
    log: Callable[[str], None] | None = None,
) -> TrialResult:
    """Run ``steps`` (until monotonic ``until`` at the latest) against the workload; see the module doc."""
    history = workdir / "history"
    history.mkdir(parents=True, exist_ok=True)
    result = TrialResult(seed=seed, history=history, report=Report())
    with Bed(workdir / "bed", log=log) as bed:
        bed.verify()
        argv = [sys.executable, "-m", WORKLOAD_MODULE, "--nodes", ",".join(bed.node_addresses)]
        argv += ["--out", str(history), "--duration", "100000", "--seed", str(seed)]
        if kinds:
            argv += ["--kinds", kinds]
        nemesis = Nemesis(bed, history, log=log)
        result.started = time.monotonic()
        workload = ManagedProcess(bed.in_ns("client", *argv), env=python_env(), cwd=ROOT)
        try:
            _wait_alive(workload, warmup)
            try:
                nemesis.run(steps, until=until)
            except Exception as exc:  # a bed that did not settle is a finding: report it, check the rest
                result.errors.append(f"nemesis: {type(exc).__name__}: {exc}")
                bed.heal_all()
            result.steps_run = steps[: nemesis.done]
            result.settle_times = list(nemesis.settle_times)
            _wait_alive(workload, tail)
            workload.signal(signal.SIGTERM)
            try:
                result.workload_exit = workload.proc.wait(timeout=final_timeout)
            except subprocess.TimeoutExpired:
                workload.kill()
                result.workload_exit = None
        finally:
            workload.kill()
            nemesis.close()
            result.ended = time.monotonic()
            result.workload_output = workload.output()
            result.slow_note = "netem" if bed.netem else "tbf rate 256kbit, latency 200ms (no sch_netem)"
    result.report = check_all(history)
    result.report.violations += result.errors
    if result.workload_exit != 0:
        result.report.violations.append(
            f"the workload exited with {result.workload_exit} (None: it did not finish its final read phase "
            f"within {final_timeout:.0f}s); its last output:\n"
            + "\n".join(result.workload_output.splitlines()[-30:])
        )
    return result


def _wait_alive(workload: ManagedProcess, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if workload.proc.poll() is not None:
            raise RuntimeError(
                f"the workload exited early ({workload.proc.returncode}):\n{workload.output()}"
            )
        time.sleep(0.2)
