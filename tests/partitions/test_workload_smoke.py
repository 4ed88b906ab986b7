"""The partition workload against one real ``rpcmesh up`` (SQLite, no faults): the checkers find nothing.

This is what keeps the checkers honest: a run with no faults must pass every invariant (no false
alarm), every kind of operation must have happened, so the checks had something to check, and the
same history damaged one way at a time must be reported (the checkers see damage in real data). The
workload runs as its own process (``python -m tests.partitions.workload``, as the bed runs it in the
client namespace) and is stopped with SIGTERM, which leads it into the final read phase.
"""

from __future__ import annotations

import copy
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tests.partitions import checks
from tests.partitions.checks import check_all
from tests.partitions.history import Op, load, load_final
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
    assert states == {"SAGA_STATE_COMPLETED", "SAGA_STATE_COMPENSATED", "SAGA_STATE_ABORTED"}, states
    assert final["bus"]["drained"] and final["bus"]["messages"] and final["registry"]["live"]
    assert all(final["eventstore"]["streams"].values()) and final["problems"] == []
    assert_damage_is_noticed(ops, final)


def assert_damage_is_noticed(ops: list[Op], final: dict[str, Any]) -> None:
    """The same real history, damaged one way at a time: the checker concerned reports it."""
    append = next(op for op in ops if op.op == "append" and op.ok)
    damaged = copy.deepcopy(final)
    stream = damaged["eventstore"]["streams"][append.args["stream"]]
    stream[:] = [event for event in stream if event[1] != append.args["event_id"]]
    assert any("is lost" in v for v in checks.check_eventstore(ops, damaged))

    publish = next(op for op in ops if op.op == "publish" and op.ok)
    damaged = copy.deepcopy(final)
    damaged["bus"]["messages"] = [m for m in damaged["bus"]["messages"] if m[1] != publish.args["id"]]
    assert any("is lost" in v for v in checks.check_bus(ops, damaged))

    damaged = copy.deepcopy(final)
    next(iter(damaged["sagas"].values()))["state"] = "SAGA_STATE_RUNNING"
    assert any("did not end" in v for v in checks.check_sagas(ops, damaged))

    damaged = copy.deepcopy(final)
    damaged["registry"]["instances"] = []
    assert any("was lost" in v for v in checks.check_registrations_kept(ops, damaged))

    renew = next(op for op in ops if op.op == "renew" and op.ok)
    lease, instance = renew.args["lease_id"], renew.args["instance_id"]
    expiry = Op(
        proc="watch-0",
        op="watch_batch",
        invoke=renew.complete + 0.5,
        complete=renew.complete + 0.5,
        result={"events": [[10**9, "DELETE", "pt-reg", instance, lease, "expired"]]},
    )
    assert any("expired early" in v for v in checks.check_lease_expiry([*ops, expiry]))
