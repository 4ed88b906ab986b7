"""The fold of the operator verbs: RetryCompensation gives a fresh budget, ResolveSaga is terminal."""

from __future__ import annotations

from rpcmesh.v1 import saga_pb2 as pb

from rpcmesh.controlplane.saga import machine
from rpcmesh.controlplane.saga.machine import Finished, Invoke, Record
from tests.unit.saga.test_machine import definition, record, start, succeed


def failed_compensation(*, aborted: bool = False) -> machine.SagaView:
    """Steps a and b succeeded, c failed; b compensated, a's compensation failed 10 times for good."""
    view = start(definition(attempts=1))
    succeed(view, "a")
    succeed(view, "b")
    if aborted:
        record(view, machine.ABORT_REQUESTED, reason="operator abort")
    else:
        record(view, machine.STEP_STARTED, step="c", attempt=1)
        record(view, machine.STEP_ATTEMPT_FAILED, step="c", code=9, error="FAILED_PRECONDITION: no")
        record(view, machine.STEP_FAILED, step="c")
        record(view, machine.SAGA_COMPENSATING, reason="step 'c' failed")
    record(view, machine.COMPENSATION_STARTED, step="b", attempt=1)
    record(view, machine.COMPENSATION_SUCCEEDED, step="b")
    for attempt in range(1, 11):
        record(view, machine.COMPENSATION_STARTED, step="a", attempt=attempt)
        record(view, machine.COMPENSATION_ATTEMPT_FAILED, step="a", code=14, error="UNAVAILABLE: down")
    decision = machine.decide(view, 100.0)
    assert isinstance(decision, Record)
    for kind, data in decision.events:
        record(view, kind, 100.0, **data)
    assert view.state == pb.SAGA_STATE_FAILED_COMPENSATION and view.finished
    assert machine.failed_compensation_step(view) == "a"
    return view


def test_retry_compensates_again_at_once_with_a_fresh_budget_then_ends_compensated() -> None:
    view = failed_compensation()
    record(view, machine.COMPENSATION_RETRY_REQUESTED, 200.0, step="a", reason="fixed", by="ops")
    assert view.state == pb.SAGA_STATE_COMPENSATING and not view.finished and view.ended_at == 0
    assert view.error == "step 'c' failed"
    assert machine.decide(view, 200.0) == Invoke(0, True, 11)  # at once: no backoff left over
    # A fresh budget: nine more failures are retried (with backoff), the tenth fails for good.
    for attempt in range(11, 20):
        record(view, machine.COMPENSATION_STARTED, 200.0, step="a", attempt=attempt)
        record(view, machine.COMPENSATION_ATTEMPT_FAILED, 200.0, step="a", code=14, error="UNAVAILABLE: x")
        decision = machine.decide(view, 10_000.0)
        assert isinstance(decision, Invoke) and decision.compensation, attempt
    record(view, machine.COMPENSATION_STARTED, 300.0, step="a", attempt=20)
    record(view, machine.COMPENSATION_SUCCEEDED, 300.0, step="a")
    assert machine.decide(view, 300.0) == Record(((machine.SAGA_COMPENSATED, {}),))
    record(view, machine.SAGA_COMPENSATED, 300.0)
    assert view.state == pb.SAGA_STATE_COMPENSATED and view.ended_at == 300.0
    assert [(a.kind, a.identity, a.reason, a.step, a.time) for a in view.operator_actions] == [
        ("retry_compensation", "ops", "fixed", "a", 200.0)
    ]


def test_retry_of_an_aborted_saga_ends_aborted() -> None:
    view = failed_compensation(aborted=True)
    record(view, machine.COMPENSATION_RETRY_REQUESTED, 200.0, step="a", reason="", by="")
    assert view.state == pb.SAGA_STATE_ABORTING and view.error == "operator abort"
    record(view, machine.COMPENSATION_STARTED, step="a", attempt=11)
    record(view, machine.COMPENSATION_SUCCEEDED, step="a")
    assert machine.decide(view, 300.0) == Record(((machine.SAGA_ABORTED, {}),))


def test_resolve_is_terminal_and_keeps_the_reason() -> None:
    view = failed_compensation()
    record(view, machine.SAGA_RESOLVED, 200.0, reason="refunded by hand", by="ops")
    assert view.state == pb.SAGA_STATE_RESOLVED_MANUALLY and view.finished and view.ended_at == 200.0
    assert machine.decide(view, 300.0) == Finished()
    assert view.operator_actions[0].reason == "refunded by hand"
    assert view.steps[0].state == pb.STEP_STATE_COMPENSATION_FAILED
