"""The compact partition schedule of issue 21: every fault once, against the full workload, checked.

A seeded schedule (:func:`tests.partitions.nemesis.schedule`: cut a node from PostgreSQL, from NATS,
from its clients, isolate it, a one-way partition, a slow link, kill -9 and SIGSTOP of a node and of a
nats-server; each held 2-8 s) runs on the namespace test bed (:mod:`tests.partitions.bed`: its own
PostgreSQL, a 3-server NATS JetStream cluster, three `rpcmesh up` nodes) while
``python -m tests.partitions.workload`` runs in the client namespace; then every invariant of
:func:`tests.partitions.checks.check_all` must hold. About 80 s; the schedule is cut short past
:data:`SCHEDULE_BUDGET` on a slow machine. ``RPCMESH_PARTITIONS_SEED`` replays another seed.

The bed's names carry a random suffix and its network is a free 10.77.x.0/24: nothing here collides
with other tests or with a long run (scripts/partitions_long.py) on the same machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.partitions.nemesis import schedule
from tests.partitions.trial import run_trial

SEED = int(os.environ.get("RPCMESH_PARTITIONS_SEED", "2121"))
SCHEDULE_BUDGET = 95.0
"""Seconds after the workload's start when no new fault starts (the test stays within ~150 s)."""

pytestmark = [pytest.mark.backend, pytest.mark.fault, pytest.mark.slow]


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("partition_bed_supported")
def test_compact_partition_schedule(tmp_path: Path) -> None:
    steps = schedule(SEED)
    result = run_trial(tmp_path, seed=SEED, steps=steps, until=time.monotonic() + SCHEDULE_BUDGET)
    ran = ", ".join(f"{step.fault} {step.target} {step.hold:.1f}s" for step in result.steps_run)
    summary = f"seed {SEED}; faults run: {ran}\n{result.report.summary()}"
    print(summary)
    assert result.report.ok, (
        f"partition invariants violated (replay: RPCMESH_PARTITIONS_SEED={SEED})\n{summary}"
    )
    assert len(result.steps_run) >= len(steps) // 2, (
        f"only {len(result.steps_run)} faults ran in time\n{summary}"
    )
