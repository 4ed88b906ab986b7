"""The partition workload against one real ``rpcmesh up`` (SQLite, no faults): the checkers find nothing.

This is what keeps the checkers honest: a run with no faults must pass every invariant (no false
alarm), and every kind of operation must have happened, so the checks had something to check. The
workload runs as its own process (``python -m tests.partitions.workload``, as the bed runs it in the
client namespace) and is stopped with SIGTERM, which leads it into the final read phase.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from tests.partitions.checks import check_all
from tests.partitions.history import load, load_final
from tests.support.processes import ManagedProcess, python_env, start_control_plane


def test_workload_without_faults_passes_every_check(tmp_path: Path) -> None:
    plane, address = start_control_plane(tmp_path / "data")
    out = tmp_path / "history"
    try:
        with ManagedProcess(
            [
                *(sys.executable, "-m", "tests.partitions.workload", "--nodes", address, "--out", str(out)),
                *("--duration", "120", "--seed", "5"),
            ],
            env=python_env(),
        ) as workload:
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline and not (out / "workload.jsonl").exists():
                time.sleep(0.1)
            time.sleep(8.0)
            workload.signal(signal.SIGTERM)
            workload.wait_for_line("workload done", timeout=60.0)
            assert workload.proc.wait(timeout=20.0) == 0, workload.output()
    finally:
        plane.terminate()
    report = check_all(out)
    assert report.violations == [], report.summary()
    ops = load(out)
    done = {op.op for op in ops if op.ok}
    assert {
        "register",
        "renew",
        "watch_batch",
        "append",
        "read_all",
        "publish",
        "deliver",
        "saga_start",
    } <= done
    assert any(op.op == "participant_call" and op.args["phase"] == "compensate" for op in ops)
    final = load_final(out)
    states = {saga["state"] for saga in final["sagas"].values()}
    assert states == {"SAGA_STATE_COMPLETED", "SAGA_STATE_COMPENSATED"}, states
    assert final["bus"]["drained"] and final["bus"]["messages"] and final["registry"]["live"]
    assert all(final["eventstore"]["streams"].values()) and final["problems"] == []
