"""Invariant checkers of the partition tests: pure functions over a history folder.

``check_all(folder)`` loads every ``*.jsonl`` (the workload's operations and the nemesis events) and
``final.json`` (the final read phase) and returns a :class:`Report`: ``violations`` (one sentence
each, naming the process, the object and the times), counters, and the availability windows per fault
kind. Each invariant is its own function taking the operations (and the final state) so the unit tests
feed them small hand-made histories.

The operation vocabulary (written by ``tests/partitions/workload.py``):

* Registry: ``register`` (args instance_id, ttl; result lease_id, revision), ``renew`` (args lease_id,
  instance_id, ttl; NOT_FOUND means the lease had expired), ``deregister`` (result revision);
  watchers: ``watch_open`` (args after_revision), ``watch_batch`` (result snapshot, revision,
  events ``[rev, type, service, instance_id, lease_id, reason]``), ``watch_out_of_range`` (the
  server said events were skipped), ``watch_error``.
* EventStore: ``append`` (args stream, event_id, expected_revision; result revision, position),
  ``read_all`` (result events ``[position, stream, event_id, revision]``).
* Bus: ``publish`` (args topic, id; result sequence, duplicate), ``sub_open`` (args group,
  max_in_flight), ``deliver`` (result deliveries ``[id, sequence, attempt]``), ``ack`` (args sequences).
* Sagas: ``saga_start`` (args key, kind, fail_last; result saga_id), ``saga_abort`` (args saga_id),
  ``participant_call`` (proc ``part-*``; args method, phase, saga_id, step, effective; node = the
  caller's address).
* Nemesis: proc ``nemesis``, op ``fault``/``heal``, args fault, target (the node names ``node1``..
  or addresses it concerns; ``ip`` when given names the node's address).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.partitions.faults import SagaFailover, check_availability, check_saga_lease_window
from tests.partitions.history import Op, load, load_final

__all__ = [
    "TERMINAL_SAGA_STATES",
    "Report",
    "SagaFailover",
    "check_all",
    "check_availability",
    "check_bus",
    "check_eventstore",
    "check_lease_expiry",
    "check_registrations_kept",
    "check_saga_lease_window",
    "check_sagas",
    "check_watchers",
]

TERMINAL_SAGA_STATES = frozenset(
    {
        "SAGA_STATE_COMPLETED",
        "SAGA_STATE_COMPENSATED",
        "SAGA_STATE_ABORTED",
        "SAGA_STATE_FAILED_COMPENSATION",
        "SAGA_STATE_RESOLVED_MANUALLY",
    }
)
COMPENSATED_SAGA_STATES = frozenset({"SAGA_STATE_COMPENSATED", "SAGA_STATE_ABORTED"})
EXPIRY_TOLERANCE = 0.1
"""Seconds of slack when comparing an expiry with a renewal's invocation (scheduling jitter)."""


@dataclass
class Report:
    """What the checkers found in one history."""

    violations: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    windows: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per fault kind: count, p50/max unavailability (s), p50/max time to recover after heal (s), and
    ``max:<component>`` (registry, eventstore, $all, bus, saga): that component's longest window."""
    saga_call_window: float | None = None
    """Longest time after a lease-losing fault at which its node still called a participant (s;
    0 when the faulted node drove the sagas and made no call after the fault)."""
    saga_failovers: list[SagaFailover] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no invariant was violated."""
        return not self.violations

    def summary(self) -> str:
        """Markdown: invariant results, counters and the availability table."""
        lines = ["### Invariants", ""]
        if self.violations:
            lines.append(f"**{len(self.violations)} violation(s):**")
            lines.extend(f"- {violation}" for violation in self.violations)
        else:
            lines.append("Every invariant held (registry, watch, EventStore, Bus, sagas).")
        lines += ["", "### Operations", "", "| counter | value |", "| --- | --- |"]
        lines.extend(f"| {name} | {value} |" for name, value in sorted(self.counts.items()))
        lines += [
            "",
            "### Availability per fault",
            "",
            "| fault | count | unavailable p50 (s) | unavailable max (s) | recover p50 (s) "
            "| recover max (s) | worst component |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for kind, row in sorted(self.windows.items()):
            groups = {key.removeprefix("max:"): value for key, value in row.items() if key.startswith("max:")}
            worst = max(groups, key=lambda name: groups[name]) if groups and max(groups.values()) > 0 else "-"
            lines.append(
                f"| {kind} | {int(row['count'])} | {row['p50']:.2f} | {row['max']:.2f} | "
                f"{row['recover_p50']:.2f} | {row['recover_max']:.2f} | {worst} |"
            )
        driving = [f for f in self.saga_failovers if f.driving]
        if driving:
            lines += [
                "",
                "### Sagas around lease-losing faults of the driving node",
                "",
                "| fault | node | its last participant call after the fault (s) | another node's first (s) |",
                "| --- | --- | --- | --- |",
            ]
            for f in driving:
                last = "none" if f.last_call is None else f"{f.last_call:.2f}"
                takeover = "none before heal" if f.takeover is None else f"{f.takeover:.2f}"
                lines.append(f"| {f.fault} | {f.target} | {last} | {takeover} |")
        if self.saga_call_window is not None:
            lines += [
                "",
                f"Lease-loss call window (longest, all such faults): {self.saga_call_window:.2f} s.",
            ]
        return "\n".join(lines) + "\n"


def _by(ops: Iterable[Op], *names: str) -> list[Op]:
    return [op for op in ops if op.op in names]


# Registry -------------------------------------------------------------------------------------


def _watch_events(ops: Sequence[Op]) -> Iterable[tuple[Op, list[Any]]]:
    for op in _by(ops, "watch_batch"):
        for event in op.result.get("events", []):
            yield op, event


def check_lease_expiry(ops: Sequence[Op]) -> list[str]:
    """Each lease expires at most once, never before TTL after a renewal acknowledged through any node.

    An expiry is observed at the latest when a watcher receives its DELETE ("expired") or a renewal
    answers NOT_FOUND. A renewal (or the registration) acknowledged after invocation at ``t`` keeps the
    lease until at least ``t + ttl`` on the expiry leader's clock, so an expiry observed earlier is a
    violation; so is a renewal acknowledged after the expiry was observed.
    """
    violations: list[str] = []
    ttl: dict[str, float] = {}
    renewals: defaultdict[str, list[Op]] = defaultdict(list)
    for op in _by(ops, "register", "renew"):
        lease = op.result.get("lease_id") or op.args.get("lease_id")
        if not lease or not op.ok:
            continue
        ttl[lease] = float(op.args.get("ttl", ttl.get(lease, 0.0)))
        renewals[lease].append(op)
    expiry_revisions: defaultdict[str, set[int]] = defaultdict(set)
    observed: dict[str, tuple[float, str]] = {}

    def observe(lease: str, at: float, how: str) -> None:
        if lease not in observed or at < observed[lease][0]:
            observed[lease] = (at, how)

    for op, event in _watch_events(ops):
        rev, kind, _service, instance, lease, reason = event
        if kind == "DELETE" and reason == "expired" and lease:
            expiry_revisions[lease].add(int(rev))
            observe(lease, op.complete, f"{op.proc} saw {instance} expire at revision {rev}")
    for op in _by(ops, "renew"):
        if op.code == "NOT_FOUND":
            observe(op.args["lease_id"], op.complete, f"{op.proc}'s renewal answered NOT_FOUND")
    for lease, revisions in sorted(expiry_revisions.items()):
        if len(revisions) > 1:
            violations.append(f"lease {lease} expired more than once (revisions {sorted(revisions)})")
    for lease, (at, how) in sorted(observed.items()):
        for renewal in renewals.get(lease, []):
            deadline = renewal.invoke + ttl[lease]
            if at < deadline - EXPIRY_TOLERANCE:
                violations.append(
                    f"lease {lease} expired early: {how} at t={at:.3f}, but {renewal.op} invoked at "
                    f"t={renewal.invoke:.3f} through {renewal.node} was acknowledged (ttl {ttl[lease]:g}s, "
                    f"so not before t={deadline:.3f})"
                )
                break
    return violations


def check_registrations_kept(ops: Sequence[Op], final: dict[str, Any]) -> list[str]:
    """No acknowledged registration lost while renewed: every lease the final phase renewed is listed."""
    registry = final.get("registry")
    if not registry:
        return []
    listed = set(registry.get("instances", []))
    violations = []
    for lease in registry.get("live", []):
        if lease.get("renewed") and lease["instance_id"] not in listed:
            violations.append(
                f"registration {lease['instance_id']} (lease {lease['lease_id']}) was renewed in the final "
                f"phase but Resolve does not list it: an acknowledged registration was lost"
            )
    return violations


def check_watchers(ops: Sequence[Op]) -> list[str]:
    """Every watcher sees revisions in increasing order, with no gap it was not told about.

    A jump from revision p to q is a gap when another watcher (or a Register answer) saw a revision
    strictly between them and this watcher was not told (OUT_OF_RANGE, then a fresh snapshot).
    """
    seen: set[int] = {int(op.result["revision"]) for op in _by(ops, "register", "deregister") if op.ok}
    seen |= {int(event[0]) for _op, event in _watch_events(ops)}
    ordered = sorted(seen)
    violations = []
    per_proc: defaultdict[str, list[Op]] = defaultdict(list)
    for op in _by(ops, "watch_batch", "watch_open", "watch_out_of_range"):
        per_proc[op.proc].append(op)
    for proc, proc_ops in sorted(per_proc.items()):
        last: int | None = None
        for op in proc_ops:
            if op.op == "watch_out_of_range" or (
                op.op == "watch_open" and op.args.get("after_revision") == 0
            ):
                last = None
                continue
            if op.op != "watch_batch":
                continue
            if op.result.get("snapshot"):
                last = int(op.result["revision"])
                continue
            for event in op.result.get("events", []):
                rev = int(event[0])
                if last is not None and rev <= last:
                    violations.append(
                        f"{proc}: revision {rev} after {last} (not increasing) at t={op.complete:.3f}"
                    )
                elif last is not None and rev > last + 1:
                    missed = [r for r in ordered if last < r < rev]
                    if missed:
                        violations.append(
                            f"{proc}: jumped from revision {last} to {rev} at t={op.complete:.3f} "
                            f"without being told, missing {missed[:5]}{'...' if len(missed) > 5 else ''}"
                        )
                last = rev if last is None else max(last, rev)
    return violations


# EventStore -----------------------------------------------------------------------------------


def check_eventstore(ops: Sequence[Op], final: dict[str, Any]) -> list[str]:
    """Acknowledged appends present once at their revision; revisions unique; ``$all`` gapless."""
    store = final.get("eventstore")
    if not store:
        return []
    violations: list[str] = []
    where: dict[tuple[str, str], tuple[int, int]] = {}
    for stream, events in sorted(store.get("streams", {}).items()):
        revisions = [int(rev) for rev, _id, _pos in events]
        if revisions != list(range(len(revisions))):
            violations.append(f"stream {stream}: revisions are not 0..{len(revisions) - 1} once each")
        ids = Counter(event_id for _rev, event_id, _pos in events)
        for event_id, count in sorted(ids.items()):
            if count > 1:
                violations.append(f"stream {stream}: event {event_id} stored {count} times")
        for rev, event_id, pos in events:
            where[(stream, event_id)] = (int(rev), int(pos))
    appended: set[tuple[str, str]] = set()
    failed: dict[tuple[str, str], Op] = {}
    for op in _by(ops, "append"):
        key = (op.args["stream"], op.args["event_id"])
        if op.ok:
            appended.add(key)
            got = where.get(key)
            expected = (int(op.result["revision"]), int(op.result["position"]))
            if got is None:
                violations.append(
                    f"acknowledged append {key[1]} to {key[0]} (revision {expected[0]}) is lost"
                )
            elif got != expected:
                violations.append(
                    f"append {key[1]} to {key[0]} acknowledged at (revision, position) {expected}, "
                    f"stored at {got}"
                )
        elif op.outcome == "fail":
            failed[key] = op
    for key, op in sorted(failed.items()):
        if key in where and key not in appended:
            violations.append(
                f"append {key[1]} to {key[0]} failed ({op.error}) but is stored at {where[key]}"
            )
    log = {int(pos): (stream, event_id) for pos, stream, event_id, _rev in store.get("all", [])}
    positions = sorted(log)
    finals = [int(pos) for pos, *_rest in store.get("all", [])]
    if finals != positions or len(set(finals)) != len(finals):
        violations.append("final $all read: positions do not strictly increase")
    for (stream, event_id), (_rev, pos) in where.items():
        if log and pos >= positions[0] and log.get(pos) != (stream, event_id):
            violations.append(f"$all position {pos} holds {log.get(pos)}, stream {stream} says {event_id}")
    per_reader: defaultdict[str, list[Op]] = defaultdict(list)
    for op in _by(ops, "read_all"):
        per_reader[op.proc].append(op)
    for proc, reads in sorted(per_reader.items()):
        last: int | None = None
        for op in reads:
            for pos, stream, event_id, _rev in op.result.get("events", []):
                pos = int(pos)
                if last is not None and pos <= last:
                    violations.append(f"{proc}: $all position {pos} after {last} (not increasing)")
                elif last is not None and pos > last + 1:
                    missed = [p for p in positions if last < p < pos]
                    if missed:
                        violations.append(f"{proc}: $all jumped from {last} to {pos}, missing {missed[:5]}")
                if pos in log and log[pos] != (stream, event_id):
                    violations.append(
                        f"{proc}: $all position {pos} read as {event_id}, final read {log[pos]}"
                    )
                last = pos if last is None else max(last, pos)
    return violations


# Bus ------------------------------------------------------------------------------------------


def check_bus(ops: Sequence[Op], final: dict[str, Any], counts: Counter[str] | None = None) -> list[str]:
    """No acknowledged publish lost; every message the group acked was delivered; duplicates bounded."""
    bus = final.get("bus")
    violations: list[str] = []
    delivered: Counter[str] = Counter()
    delivered_seqs: set[int] = set()
    sessions: Counter[str] = Counter()
    window: dict[str, int] = {}
    duplicates = 0
    for op in _by(ops, "sub_open", "deliver", "ack"):
        if op.op == "sub_open":
            sessions[op.proc] += 1
            window[op.proc] = int(op.args.get("max_in_flight", 1))
        elif op.op == "deliver":
            for message_id, sequence, _attempt in op.result.get("deliveries", []):
                if delivered[message_id]:
                    duplicates += 1
                delivered[message_id] += 1
                delivered_seqs.add(int(sequence))
        else:
            for sequence in op.args.get("sequences", []):
                if int(sequence) not in delivered_seqs:
                    violations.append(f"{op.proc} acked sequence {sequence} it was never delivered")
    bound = sum(sessions[proc] * window.get(proc, 1) for proc in sessions)
    if counts is not None:
        counts["bus duplicate deliveries"] += duplicates
        counts["bus subscribe sessions"] += sum(sessions.values())
    if duplicates > bound:
        violations.append(
            f"bus: {duplicates} duplicate deliveries, more than the in-flight windows allow "
            f"({sum(sessions.values())} sessions, bound {bound})"
        )
    if not bus:
        return violations
    stored = {str(message_id): int(seq) for seq, message_id in bus.get("messages", [])}
    for op in _by(ops, "publish"):
        if not op.ok:
            continue
        message_id = op.args["id"]
        if message_id not in stored:
            violations.append(
                f"acknowledged publish {message_id} (sequence {op.result.get('sequence')}) is lost"
            )
        elif not delivered[message_id]:
            violations.append(f"acknowledged publish {message_id} was never delivered to the group")
    floor = int(bus.get("ack_floor", 0))
    for message_id, seq in sorted(stored.items(), key=lambda item: item[1]):
        if seq <= floor and message_id not in delivered:
            violations.append(
                f"group ack floor {floor} covers sequence {seq} ({message_id}), never delivered"
            )
    return violations


# Sagas ----------------------------------------------------------------------------------------


def check_sagas(ops: Sequence[Op], final: dict[str, Any], counts: Counter[str] | None = None) -> list[str]:
    """Every saga ends; a compensated saga undoes each applied step exactly once; a completed one none.

    A saga whose abort was acknowledged (``saga_abort`` ok) must not complete.
    """
    sagas: dict[str, Any] = final.get("sagas", {})
    violations: list[str] = []
    applied: Counter[tuple[str, str]] = Counter()
    undone: Counter[tuple[str, str]] = Counter()
    calls: Counter[tuple[str, str, str]] = Counter()
    for op in _by(ops, "participant_call"):
        calls[(op.args["saga_id"], op.args["step"], str(op.args.get("phase")))] += 1
        if not op.args.get("effective"):
            continue
        key = (op.args["saga_id"], op.args["step"])
        (undone if op.args.get("phase") == "compensate" else applied)[key] += 1
    aborted = {op.args["saga_id"]: op for op in _by(ops, "saga_abort") if op.ok}
    if counts is not None:
        counts["saga participant calls repeated (at-least-once)"] += sum(n - 1 for n in calls.values())
        counts["saga aborts acknowledged"] += len(aborted)
    for (saga_id, step), count in sorted(applied.items()):
        if count > 1:
            violations.append(f"saga {saga_id} step {step} took effect {count} times")
    for saga_id, saga in sorted(sagas.items()):
        state = saga.get("state", "")
        if counts is not None:
            counts[f"sagas {state.removeprefix('SAGA_STATE_').lower()}"] += 1
        if state not in TERMINAL_SAGA_STATES:
            violations.append(f"saga {saga_id} ({saga.get('key')}) did not end: {state}")
            continue
        for step in saga.get("steps", []):
            key = (saga_id, step["name"])
            if state in COMPENSATED_SAGA_STATES and applied[key] and undone[key] != 1:
                violations.append(
                    f"saga {saga_id} ({state}): step {step['name']} applied, compensated {undone[key]} times"
                )
            if state == "SAGA_STATE_COMPLETED" and undone[key]:
                violations.append(f"saga {saga_id} completed but step {step['name']} was compensated")
        if state == "SAGA_STATE_COMPLETED" and saga_id in aborted:
            violations.append(
                f"saga {saga_id} completed although its abort was acknowledged at "
                f"t={aborted[saga_id].complete:.3f} through {aborted[saga_id].node}"
            )
        if state == "SAGA_STATE_COMPLETED" and saga.get("fail_last"):
            violations.append(f"saga {saga_id} completed although its last step always fails")
    return violations


def _capped(violations: list[str], keep: int = 20) -> list[str]:
    """The first ``keep`` violations of one checker, then one line counting the rest."""
    if len(violations) <= keep:
        return violations
    return [*violations[:keep], f"... and {len(violations) - keep} more like the above"]


def check_all(history_dir: Path, *, saga_window_limit: float = 6.0) -> Report:
    """Run every checker on the history folder (``*.jsonl`` plus ``final.json``)."""
    ops = load(history_dir)
    final = load_final(history_dir)
    report = Report()
    for op in ops:
        if op.proc != "nemesis":
            report.counts[f"{op.op} {op.outcome}"] += 1
    if not final:
        report.violations.append(f"{history_dir}: no final.json (the final read phase did not run)")
    report.violations += _capped(check_lease_expiry(ops))
    report.violations += _capped(check_registrations_kept(ops, final))
    report.violations += _capped(check_watchers(ops))
    report.violations += _capped(check_eventstore(ops, final))
    report.violations += _capped(check_bus(ops, final, report.counts))
    report.violations += _capped(check_sagas(ops, final, report.counts))
    saga_violations, report.saga_failovers = check_saga_lease_window(ops, saga_window_limit, report.counts)
    report.violations += _capped(saga_violations)
    windows = [f.last_call or 0.0 for f in report.saga_failovers if f.driving or f.last_call is not None]
    report.saga_call_window = max(windows) if windows else None
    report.violations += [f"final phase: {problem}" for problem in final.get("problems", [])]
    report.windows = check_availability(ops)
    return report
