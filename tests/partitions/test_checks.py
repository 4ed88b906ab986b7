"""The partition checkers on small hand-made histories: each invariant holds on one and fails on another."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.partitions import checks
from tests.partitions.history import HistoryWriter, Op, load, load_final


def op(proc: str, name: str, t: float, outcome: str = "ok", node: str | None = None, **fields: Any) -> Op:
    return Op(
        proc=proc,
        op=name,
        invoke=t,
        complete=fields.pop("complete", t + 0.01),
        outcome=outcome,
        args=fields.pop("args", {}),
        result=fields.pop("result", {}),
        error=fields.pop("error", None),
        node=node,
    )


def register(t: float, lease: str = "L1", instance: str = "i1", revision: int = 1) -> Op:
    return op(
        "reg-0",
        "register",
        t,
        args={"instance_id": instance, "ttl": 5.0},
        result={"lease_id": lease, "revision": revision},
    )


def renew(t: float, lease: str = "L1", outcome: str = "ok", error: str | None = None) -> Op:
    return op(
        "reg-0", "renew", t, outcome, args={"lease_id": lease, "instance_id": "i1", "ttl": 5.0}, error=error
    )


def batch(proc: str, t: float, *events: list[Any], snapshot: bool = False, revision: int | None = None) -> Op:
    rev = revision if revision is not None else max((int(e[0]) for e in events), default=0)
    return op(proc, "watch_batch", t, result={"snapshot": snapshot, "revision": rev, "events": list(events)})


def put(rev: int, instance: str = "i1", lease: str = "L1") -> list[Any]:
    return [rev, "PUT", "svc", instance, lease, ""]


def expired(rev: int, instance: str = "i1", lease: str = "L1") -> list[Any]:
    return [rev, "DELETE", "svc", instance, lease, "expired"]


# Registry -------------------------------------------------------------------------------------


def test_lease_expiring_after_its_ttl_is_fine() -> None:
    ops = [register(0.0), renew(1.0), batch("watch-0", 7.0, expired(2))]
    assert checks.check_lease_expiry(ops) == []


def test_lease_expiring_before_ttl_after_a_renewal_is_a_violation() -> None:
    ops = [register(0.0), renew(3.0), batch("watch-0", 6.0, expired(2))]
    [violation] = checks.check_lease_expiry(ops)
    assert "expired early" in violation and "L1" in violation


def test_renewal_not_found_soon_after_an_acknowledged_renewal_is_a_violation() -> None:
    ops = [register(0.0), renew(1.0), renew(2.0, outcome="fail", error="NOT_FOUND: lease expired")]
    assert "expired early" in checks.check_lease_expiry(ops)[0]


def test_renewal_acknowledged_after_the_expiry_was_seen_is_a_violation() -> None:
    ops = [register(0.0), batch("watch-0", 6.0, expired(2)), renew(8.0)]
    assert checks.check_lease_expiry(ops)


def test_lease_expiring_twice_is_a_violation() -> None:
    ops = [register(0.0), batch("watch-0", 7.0, expired(2)), batch("watch-1", 7.5, expired(5))]
    assert any("more than once" in v for v in checks.check_lease_expiry(ops))
    same = [register(0.0), batch("watch-0", 7.0, expired(2)), batch("watch-1", 7.5, expired(2))]
    assert checks.check_lease_expiry(same) == []


def test_watcher_with_increasing_revisions_is_fine() -> None:
    ops = [
        op("watch-0", "watch_open", 0.0, args={"after_revision": 0}),
        batch("watch-0", 0.1, put(3), snapshot=True, revision=3),
        batch("watch-0", 0.2, put(4), put(5)),
        op("watch-0", "watch_open", 0.3, args={"after_revision": 5}),
        batch("watch-0", 0.4, put(6)),
    ]
    assert checks.check_watchers(ops) == []


def test_watcher_going_backwards_is_a_violation() -> None:
    ops = [batch("watch-0", 0.1, put(3), snapshot=True, revision=3), batch("watch-0", 0.2, put(3))]
    assert "not increasing" in checks.check_watchers(ops)[0]


def test_watcher_gap_is_a_violation_unless_told() -> None:
    other = batch("watch-1", 0.1, put(4), put(5), put(6))
    gap = [batch("watch-0", 0.1, put(3), snapshot=True, revision=3), batch("watch-0", 0.2, put(6)), other]
    [violation] = checks.check_watchers(gap)
    assert "watch-0" in violation and "[4, 5]" in violation
    told = [
        batch("watch-0", 0.1, put(3), snapshot=True, revision=3),
        op("watch-0", "watch_out_of_range", 0.15, "fail", error="OUT_OF_RANGE: compacted"),
        op("watch-0", "watch_open", 0.16, args={"after_revision": 0}),
        batch("watch-0", 0.2, put(6), snapshot=True, revision=6),
        batch("watch-0", 0.3, put(7)),
        other,
    ]
    assert checks.check_watchers(told) == []


def test_registration_missing_from_final_resolve_is_lost() -> None:
    live = [{"instance_id": "i1", "lease_id": "L1", "renewed": True}]
    final: dict[str, Any] = {"registry": {"live": live, "instances": []}}
    assert "lost" in checks.check_registrations_kept([], final)[0]
    final["registry"]["instances"] = ["i1"]
    assert checks.check_registrations_kept([], final) == []


# EventStore -----------------------------------------------------------------------------------


def append(event_id: str, t: float, outcome: str = "ok", revision: int = 0, position: int = 1) -> Op:
    result = {"revision": revision, "position": position} if outcome == "ok" else {}
    error = None if outcome == "ok" else "FAILED_PRECONDITION: wrong expected version"
    return op(
        "es-0", "append", t, outcome, args={"stream": "s", "event_id": event_id}, result=result, error=error
    )


def store(*events: tuple[int, str, int]) -> dict[str, Any]:
    return {
        "eventstore": {
            "streams": {"s": [list(e) for e in events]},
            "all": [[pos, "s", event_id, rev] for rev, event_id, pos in events],
        }
    }


def test_eventstore_consistent_history_passes() -> None:
    ops = [
        append("a", 0.0, revision=0, position=1),
        append("b", 1.0, revision=1, position=2),
        append("c", 2.0, "fail"),
    ]
    reads = [op("all-0", "read_all", 1.5, result={"events": [[1, "s", "a", 0], [2, "s", "b", 1]]})]
    assert checks.check_eventstore(ops + reads, store((0, "a", 1), (1, "b", 2))) == []


def test_eventstore_lost_or_moved_or_duplicated_append_is_a_violation() -> None:
    ops = [append("a", 0.0, revision=0, position=1), append("b", 1.0, revision=1, position=2)]
    assert "lost" in checks.check_eventstore(ops, store((0, "a", 1)))[0]
    assert "stored at" in checks.check_eventstore(ops, store((0, "a", 1), (1, "x", 2), (2, "b", 3)))[0]
    doubled = checks.check_eventstore(ops, store((0, "a", 1), (1, "b", 2), (2, "b", 3)))
    assert any("stored 2 times" in v for v in doubled)


def test_eventstore_failed_append_that_is_stored_is_a_violation() -> None:
    ops = [append("a", 0.0, revision=0, position=1), append("b", 1.0, "fail")]
    assert "failed" in checks.check_eventstore(ops, store((0, "a", 1), (1, "b", 2)))[0]


def test_eventstore_shared_revision_is_a_violation() -> None:
    final = store((0, "a", 1), (0, "b", 2))
    assert any("revisions" in v for v in checks.check_eventstore([], final))


def test_all_reader_gap_or_reorder_is_a_violation() -> None:
    final = store((0, "a", 1), (1, "b", 2), (2, "c", 3))
    gap = [op("all-0", "read_all", 1.0, result={"events": [[1, "s", "a", 0], [3, "s", "c", 2]]})]
    assert "missing [2]" in checks.check_eventstore(gap, final)[0]
    back = [op("all-0", "read_all", 1.0, result={"events": [[2, "s", "b", 1], [1, "s", "a", 0]]})]
    assert "not increasing" in checks.check_eventstore(back, final)[0]


# Bus ------------------------------------------------------------------------------------------


def publish(message_id: str, t: float, sequence: int, outcome: str = "ok") -> Op:
    return op(
        "pub-0", "publish", t, outcome, args={"topic": "t", "id": message_id}, result={"sequence": sequence}
    )


def deliver(t: float, *deliveries: tuple[str, int]) -> Op:
    return op("grp-0", "deliver", t, result={"deliveries": [[i, s, 1] for i, s in deliveries]})


def bus_final(*messages: tuple[int, str], floor: int = 0) -> dict[str, Any]:
    return {"bus": {"messages": [list(m) for m in messages], "ack_floor": floor, "drained": True}}


def test_bus_consistent_history_passes() -> None:
    ops = [
        op("grp-0", "sub_open", 0.0, args={"group": "g", "max_in_flight": 2}),
        publish("m1", 0.1, 1),
        publish("m2", 0.2, 2),
        deliver(0.3, ("m1", 1), ("m2", 2)),
        op("grp-0", "ack", 0.4, args={"sequences": [1, 2]}),
        op("grp-0", "sub_open", 0.5, args={"group": "g", "max_in_flight": 2}),
        deliver(0.6, ("m2", 2)),  # redelivered once after a reconnect: within the window
    ]
    counts: Counter[str] = Counter()
    assert checks.check_bus(ops, bus_final((1, "m1"), (2, "m2"), floor=2), counts) == []
    assert counts["bus duplicate deliveries"] == 1


def test_bus_lost_publish_is_a_violation() -> None:
    ops = [publish("m1", 0.1, 1), deliver(0.3, ("m1", 1))]
    assert "lost" in checks.check_bus([*ops, publish("m2", 0.2, 2)], bus_final((1, "m1")))[0]


def test_bus_undelivered_publish_and_acked_undelivered_are_violations() -> None:
    ops = [publish("m1", 0.1, 1), publish("m2", 0.2, 2), deliver(0.3, ("m1", 1))]
    violations = checks.check_bus(ops, bus_final((1, "m1"), (2, "m2"), floor=2))
    assert any("never delivered to the group" in v for v in violations)
    assert any("ack floor" in v for v in violations)
    stray_ack = [*ops, op("grp-0", "ack", 0.4, args={"sequences": [7]})]
    assert any("never delivered" in v for v in checks.check_bus(stray_ack, {}))


def test_bus_duplicates_beyond_the_window_are_a_violation() -> None:
    ops = [op("grp-0", "sub_open", 0.0, args={"group": "g", "max_in_flight": 1})]
    ops += [deliver(0.1 + i / 10, ("m1", 1)) for i in range(4)]
    assert "duplicate deliveries" in checks.check_bus(ops, {})[0]


# Sagas ----------------------------------------------------------------------------------------


def call(
    saga: str, step: str, phase: str, t: float, node: str = "10.77.0.31:40000", effective: bool = True
) -> Op:
    method = "Do" if phase == "execute" else "Undo"
    args = {"saga_id": saga, "step": step, "phase": phase, "method": method, "effective": effective}
    return op("part-a", "participant_call", t, node=node, args=args)


def saga_final(state: str, *steps: str, fail_last: bool = False) -> dict[str, Any]:
    return {"sagas": {"s1": {"state": state, "fail_last": fail_last, "steps": [{"name": s} for s in steps]}}}


def test_compensated_saga_with_one_undo_per_step_passes() -> None:
    ops = [
        call("s1", "a", "execute", 1.0),
        call("s1", "a", "compensate", 2.0),
        call("s1", "a", "compensate", 2.5, effective=False),
    ]
    final = saga_final("SAGA_STATE_COMPENSATED", "a", "b", fail_last=True)
    assert checks.check_sagas(ops, final) == []


def test_saga_not_ending_or_compensated_twice_or_never_is_a_violation() -> None:
    assert "did not end" in checks.check_sagas([], saga_final("SAGA_STATE_RUNNING", "a"))[0]
    twice = [
        call("s1", "a", "execute", 1.0),
        call("s1", "a", "compensate", 2.0),
        call("s1", "a", "compensate", 3.0),
    ]
    assert "compensated 2 times" in checks.check_sagas(twice, saga_final("SAGA_STATE_COMPENSATED", "a"))[0]
    never = [call("s1", "a", "execute", 1.0)]
    assert "compensated 0 times" in checks.check_sagas(never, saga_final("SAGA_STATE_COMPENSATED", "a"))[0]
    done = [call("s1", "a", "execute", 1.0), call("s1", "a", "compensate", 2.0)]
    assert "was compensated" in checks.check_sagas(done, saga_final("SAGA_STATE_COMPLETED", "a"))[0]
    applied_twice = [call("s1", "a", "execute", 1.0), call("s1", "a", "execute", 1.5)]
    assert (
        "took effect 2 times" in checks.check_sagas(applied_twice, saga_final("SAGA_STATE_COMPLETED", "a"))[0]
    )


def test_participant_call_long_after_a_lease_losing_fault_is_a_violation() -> None:
    args = {"fault": "cut-pg", "target": "node1", "ip": "10.77.0.31"}
    fault = op("nemesis", "fault", 10.0, args=args)
    heal = op("nemesis", "heal", 30.0, args=args)
    early = [
        fault,
        call("s1", "a", "execute", 12.0, node="ipv4:10.77.0.31:40000"),
        call("s1", "b", "execute", 15.0, node="ipv4:10.77.0.32:1"),
        heal,
    ]
    violations, [failover] = checks.check_saga_lease_window(early, limit=6.0)
    assert violations == [] and failover.last_call == pytest.approx(2.0)
    late = [*early, call("s2", "a", "execute", 20.0, node="ipv4:10.77.0.31:40000")]
    violations, [failover] = checks.check_saga_lease_window(sorted(late, key=lambda o: o.invoke), limit=6.0)
    assert len(violations) == 1 and failover.last_call == pytest.approx(10.0)
    assert "10.77.0.31" in violations[0] and "cut-pg" in violations[0]


def test_lease_window_maps_node_names_through_the_workload_nodes() -> None:
    start = op("workload", "start", 0.0, args={"nodes": ["10.77.5.31:7000", "10.77.5.32:7000"]})
    args = {"fault": "sigstop-node", "target": "node2"}
    ops = [
        start,
        op("nemesis", "fault", 10.0, args=args),
        call("s1", "a", "execute", 18.0, node="ipv4:10.77.5.32:5"),
        op("nemesis", "heal", 20.0, args=args),
        call("s1", "b", "execute", 20.5, node="ipv4:10.77.5.32:5"),
    ]
    counts: Counter[str] = Counter()
    violations, [failover] = checks.check_saga_lease_window(ops, limit=6.0, counts=counts)
    assert len(violations) == 1 and failover.last_call == pytest.approx(8.0)
    assert counts["saga calls within 2 s of a node's SIGCONT"] == 1
    harmless = {**args, "fault": "cut-clients"}
    ops[1].args = ops[3].args = harmless
    assert checks.check_saga_lease_window(ops, limit=6.0) == ([], [])


def test_failover_of_the_driving_node_is_measured(tmp_path: Path) -> None:
    args = {"fault": "cut-pg", "target": "node1", "ip": "10.77.0.31"}
    ops = [
        call("s1", "a", "execute", 5.0, node="ipv4:10.77.0.31:1"),
        op("nemesis", "fault", 10.0, args=args),
        call("s2", "a", "execute", 14.5, node="ipv4:10.77.0.32:1"),
        op("nemesis", "heal", 20.0, args=args),
    ]
    violations, [failover] = checks.check_saga_lease_window(ops)
    assert violations == [] and failover.driving and failover.last_call is None
    assert failover.takeover == pytest.approx(4.5)
    writer = HistoryWriter(tmp_path / "w.jsonl")
    for item in ops:
        writer.write(item)
    writer.close()
    report = checks.check_all(tmp_path)
    assert report.saga_call_window == 0.0 and "| cut-pg | node1 | none | 4.50 |" in report.summary()


# Availability and the whole report -------------------------------------------------------------


def test_availability_windows_per_fault_kind() -> None:
    isolate = op("nemesis", "fault", 10.0, args={"fault": "isolate", "target": "node1"})
    ops = [
        isolate,
        *(append(f"e{i}", float(i), revision=i, position=i + 1) for i in range(10)),
        append("x", 11.0, "unknown"),
        append("y", 12.0, "fail"),  # a wrong expected revision is an answer: available again
        append("w", 15.0, "unknown"),
        # Another client answered meanwhile: windows are per client, this one's is still open.
        op(
            "es-1",
            "append",
            16.0,
            args={"stream": "s", "event_id": "q"},
            result={"revision": 9, "position": 9},
        ),
        op("nemesis", "heal", 20.0, args={"fault": "isolate", "target": "node1"}),
        append("z", 21.0, revision=11, position=12),
        op("nemesis", "fault", 30.0, args={"fault": "slow", "target": "node2"}),
        append("v", 31.0, revision=12, position=13),
        op("nemesis", "heal", 35.0, args={"fault": "slow", "target": "node2"}),
    ]
    for item in ops:
        if item.outcome == "unknown":
            item.complete = item.invoke + 2.0
    windows = checks.check_availability(sorted(ops, key=lambda o: o.invoke))
    row = windows["isolate"]
    assert row["count"] == 1 and row["max"] == pytest.approx(6.01, abs=0.02)  # 15.0 .. 21.01
    assert row["recover_max"] == pytest.approx(1.01, abs=0.02)
    assert windows["slow"]["max"] == 0.0 and windows["slow"]["recover_max"] == 0.0
    assert row["max:eventstore"] == row["max"] and "max:bus" not in row


def test_check_all_reads_a_folder_and_summarises(tmp_path: Path) -> None:
    writer = HistoryWriter(tmp_path / "client.jsonl")
    for item in [register(0.0), renew(1.0), append("a", 1.5, revision=0, position=1)]:
        writer.write(item)
    writer.close()
    (tmp_path / "nemesis.jsonl").write_text(
        op("nemesis", "fault", 0.5, args={"fault": "delay", "target": "node2"}).to_json()
        + "\n"
        + op("nemesis", "heal", 1.8, args={"fault": "delay", "target": "node2"}).to_json()
        + "\n{cut"
    )
    final = store((0, "a", 1))
    final["registry"] = {
        "live": [{"instance_id": "i1", "lease_id": "L1", "renewed": True}],
        "instances": ["i1"],
    }
    (tmp_path / "final.json").write_text(json.dumps(final))
    assert len(load(tmp_path)) == 5 and load_final(tmp_path)["registry"]
    report = checks.check_all(tmp_path)
    assert report.violations == [] and report.ok
    assert "delay" in report.windows and "| delay | 1 |" in report.summary()
    assert report.summary().count("| registry |") == 0
    (tmp_path / "final.json").unlink()
    assert not checks.check_all(tmp_path).ok


def test_many_violations_of_one_kind_are_capped() -> None:
    assert len(checks._capped([f"v{i}" for i in range(50)])) == 21
    assert checks._capped(["a"]) == ["a"]


def test_all_log_disagreeing_with_a_stream_or_out_of_order_is_a_violation() -> None:
    final = store((0, "a", 1), (1, "b", 2))
    final["eventstore"]["all"] = [[1, "s", "a", 0], [2, "s", "x", 1]]
    assert any("$all position 2" in v for v in checks.check_eventstore([], final))
    final["eventstore"]["all"] = [[2, "s", "b", 1], [1, "s", "a", 0]]
    assert any("do not strictly increase" in v for v in checks.check_eventstore([], final))


def test_saga_whose_last_step_always_fails_must_not_complete() -> None:
    final = saga_final("SAGA_STATE_COMPLETED", "a", fail_last=True)
    assert any("always fails" in v for v in checks.check_sagas([], final))


def test_final_phase_problems_are_violations(tmp_path: Path) -> None:
    (tmp_path / "final.json").write_text(json.dumps({"problems": ["final read failed: UNAVAILABLE: x"]}))
    report = checks.check_all(tmp_path)
    assert report.violations == ["final phase: final read failed: UNAVAILABLE: x"]


def test_saga_completing_after_an_acknowledged_abort_is_a_violation() -> None:
    abort = op("saga-abort", "saga_abort", 1.0, args={"saga_id": "s1"}, node="10.77.0.31:7000")
    final = saga_final("SAGA_STATE_COMPLETED", "a")
    assert any("abort was acknowledged" in v for v in checks.check_sagas([abort], final))
    refused = op(
        "saga-abort", "saga_abort", 1.0, "fail", args={"saga_id": "s1"}, error="FAILED_PRECONDITION: x"
    )
    assert checks.check_sagas([refused], final) == []
    applied = [abort, call("s1", "a", "execute", 0.5), call("s1", "a", "compensate", 2.0)]
    assert checks.check_sagas(applied, saga_final("SAGA_STATE_ABORTED", "a")) == []
