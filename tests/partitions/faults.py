"""Fault-relative measurements of the partition checks: saga lease-loss windows and availability.

Both pair each nemesis fault with its heal (:func:`fault_pairs`) and look at the client operations
around it; :func:`tests.partitions.checks.check_all` runs them and puts the results in its report.
"""

from __future__ import annotations

import bisect
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from tests.partitions.history import UNKNOWN as UNKNOWN_OUTCOME
from tests.partitions.history import Op

__all__ = [
    "AVAILABILITY_GROUPS",
    "LEASE_LOSING_FAULTS",
    "SagaFailover",
    "check_availability",
    "check_saga_lease_window",
    "fault_pairs",
]

LEASE_LOSING_FAULTS = ("isolate", "pg", "postgres", "sigstop", "stop", "pause")
"""Substrings of fault names after which the faulted node loses its saga driver lock."""


def fault_pairs(ops: Sequence[Op], end: float) -> list[tuple[Op, float]]:
    """Each nemesis fault with the time of its heal (the next heal naming the same target, or any)."""
    nemesis = [op for op in ops if op.proc == "nemesis"]
    pairs = []
    for index, fault in enumerate(nemesis):
        if fault.op != "fault":
            continue
        heal = end
        for later in nemesis[index + 1 :]:
            if later.op == "heal" and later.args.get("target") in (None, "", fault.args.get("target")):
                heal = later.invoke
                break
        pairs.append((fault, heal))
    return pairs


def _fault_nodes(fault: Op, nodes: Sequence[str]) -> set[str]:
    """The node hosts a fault concerns: its ``ip``, or ``nodeK`` as the K-th of the workload's nodes."""
    text = f"{fault.args.get('target', '')} {fault.args.get('ip', '')}"
    hosts = set(re.findall(r"\d+\.\d+\.\d+\.\d+", text))
    for number in re.findall(r"node(\d+)", text):
        if 0 < int(number) <= len(nodes):
            hosts.add(nodes[int(number) - 1].rsplit(":", 1)[0])
    return hosts


def _workload_nodes(ops: Sequence[Op]) -> list[str]:
    """The ``--nodes`` of the workload (from its ``start`` record), in order."""
    for op in ops:
        if op.proc == "workload" and op.op == "start":
            return [str(node) for node in op.args.get("nodes", [])]
    return []


@dataclass
class SagaFailover:
    """What the sagas did around one lease-losing fault of a node."""

    fault: str
    target: str
    driving: bool
    """The node made the last participant call before the fault (it was driving the sagas)."""
    last_call: float | None
    """Seconds after the fault of the node's last participant call while the fault lasted."""
    takeover: float | None
    """Seconds after the fault of the first participant call from another node (driving faults)."""


def _host(call: Op) -> str:
    return (call.node or "").rsplit(":", 1)[0].removeprefix("ipv4:")


def check_saga_lease_window(
    ops: Sequence[Op], limit: float = 6.0, counts: Counter[str] | None = None
) -> tuple[list[str], list[SagaFailover]]:
    """A node that lost its saga lock calls no participant later than ``limit`` s after the fault.

    Lease-losing faults cut the node from PostgreSQL (``cut-pg``, ``one-way-pg``, ``isolate``) or
    freeze it (``sigstop-node``). Returns the violations and, per such fault, when the node last
    called a participant and when another node took over. A frozen node cannot call anyone; the
    calls it makes within 2 s of waking (documented: a call in flight when it froze may still go
    out) are counted in ``counts``.
    """
    end = max((op.complete for op in ops), default=0.0)
    calls = [op for op in ops if op.op == "participant_call"]
    workload_nodes = _workload_nodes(ops)
    violations: list[str] = []
    failovers: list[SagaFailover] = []
    for fault, heal in fault_pairs(ops, end):
        name = str(fault.args.get("fault", ""))
        if not any(part in name for part in LEASE_LOSING_FAULTS):
            continue
        nodes = _fault_nodes(fault, workload_nodes)
        before = [call for call in calls if call.invoke < fault.invoke]
        driving = bool(before) and _host(before[-1]) in nodes
        last_call: float | None = None
        takeover: float | None = None
        for call in calls:
            if call.invoke < fault.invoke:
                continue
            if _host(call) not in nodes:
                if takeover is None and driving and call.invoke < heal:
                    takeover = call.invoke - fault.invoke
                continue
            if counts is not None and "stop" in name and heal <= call.invoke < heal + 2.0:
                counts["saga calls within 2 s of a node's SIGCONT"] += 1
            if call.invoke >= heal:
                continue
            delay = call.invoke - fault.invoke
            last_call = delay if last_call is None else max(last_call, delay)
            if delay > limit:
                violations.append(
                    f"{_host(call)} called {call.args.get('method')} for saga {call.args.get('saga_id')} "
                    f"{delay:.2f}s after {name} on {fault.args.get('target')} (limit {limit:g}s)"
                )
        failovers.append(SagaFailover(name, str(fault.args.get("target", "")), driving, last_call, takeover))
    return violations, failovers


# Availability ---------------------------------------------------------------------------------

AVAILABILITY_GROUPS = {
    "registry": ("register", "renew"),
    "eventstore": ("append",),
    "$all": ("read_all",),
    "bus": ("publish",),
    "saga": ("saga_start",),
}
"""The operations whose answers measure availability, grouped by component."""


def _unavailable(
    ops: Sequence[Op], invokes: Sequence[float], fault: float, heal: float, end: float
) -> tuple[float, float]:
    """The longest unanswered stretch starting before ``heal``, and how long after it answers resumed.

    An answer is ``ok`` or a definite ``fail`` (a wrong expected revision is the store answering);
    ``unknown`` (timeouts, UNAVAILABLE) is no answer. The time to recover is 0 when the operations
    were being answered when the fault was healed.
    """
    worst = 0.0
    down: float | None = None
    recover = 0.0
    # Operations last seconds at most (their deadlines): start a minute before the fault.
    first = bisect.bisect_left(invokes, fault - 60.0)
    for op in ops[first:]:
        if op.complete < fault:
            continue
        if op.invoke >= heal and down is None:
            break
        if op.outcome == UNKNOWN_OUTCOME:
            if down is None:
                down = max(op.invoke, fault)
            continue
        if down is not None:
            worst = max(worst, op.complete - down)
            if op.complete >= heal:
                recover = op.complete - heal
                break
        down = None
    else:
        if down is not None:
            worst = max(worst, end - down)
            recover = end - heal
    return worst, recover


def check_availability(ops: Sequence[Op]) -> dict[str, dict[str, float]]:
    """Per fault kind: p50/max of the longest unanswered stretch, and of the time to recover after heal.

    Measured per client (each workload task of each component, as a user of rpcmesh sees it: a
    client whose node froze waits out its deadline, then moves on): for each fault the
    unavailability is the longest time, starting during the fault, in which one client's
    operations got no answer; the time to recover is how long after the heal the first answer
    came for a client still unanswered at the heal (0 when none was).
    """
    end = max((op.complete for op in ops), default=0.0)
    client = [op for op in ops if op.proc not in ("nemesis", "final")]
    component = {op_name: name for name, names in AVAILABILITY_GROUPS.items() for op_name in names}
    groups: defaultdict[tuple[str, str], list[Op]] = defaultdict(list)
    for op in client:
        if op.op in component:
            groups[(component[op.op], op.proc)].append(op)
    invokes = {key: [op.invoke for op in group] for key, group in groups.items()}
    per_kind: defaultdict[str, list[tuple[float, float]]] = defaultdict(list)
    per_group: defaultdict[str, dict[str, float]] = defaultdict(dict)
    for fault, heal in fault_pairs(ops, end):
        kind = str(fault.args.get("fault", "fault"))
        worst, recover = 0.0, 0.0
        for (name, proc), group in groups.items():
            gap, back = _unavailable(group, invokes[(name, proc)], fault.invoke, heal, end)
            worst, recover = max(worst, gap), max(recover, back)
            per_group[kind][f"max:{name}"] = max(per_group[kind].get(f"max:{name}", 0.0), gap)
        per_kind[kind].append((worst, recover))
    windows = {}
    for kind, rows in per_kind.items():
        gaps = [row[0] for row in rows]
        recovers = [row[1] for row in rows]
        windows[kind] = {
            "count": float(len(rows)),
            "p50": statistics.median(gaps),
            "max": max(gaps),
            "recover_p50": statistics.median(recovers),
            "recover_max": max(recovers),
            **per_group[kind],
        }
    return windows
