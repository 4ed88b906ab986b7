from __future__ import annotations

import pytest
from google.protobuf import wrappers_pb2
from rpcmesh.v1 import saga_pb2 as pb

from rpcmesh.controlplane.saga import machine
from rpcmesh.controlplane.saga.machine import Finished, Invoke, Record, SagaEvent


def definition(*, no_comp_last: bool = False, attempts: int = 3) -> pb.SagaDefinition:
    steps = []
    for index, name in enumerate(["a", "b", "c"]):
        step = pb.SagaStep(
            name=name, service="svc", method="/p.S/Do", retry=pb.RetryPolicy(max_attempts=attempts)
        )
        if no_comp_last and index == 2:
            step.no_compensation = True
        else:
            step.compensation_method = "/p.S/Undo"
        step.retry.initial_backoff.FromMilliseconds(100)
        steps.append(step)
    return pb.SagaDefinition(name="d", version=1, steps=steps)


def start(defn: pb.SagaDefinition | None = None) -> machine.SagaView:
    event = machine.started_event(
        saga_id="s1",
        definition=defn or definition(),
        input_data=b"in",
        idempotency_key="",
        trace_context={},
        correlation_id="",
        labels={},
        now=0.0,
    )
    return machine.fold([event])


def record(view: machine.SagaView, kind: str, now: float = 1.0, **data: object) -> None:
    machine.apply(view, SagaEvent(kind, data, now))


def succeed(view: machine.SagaView, step: str) -> None:
    record(view, machine.STEP_STARTED, step=step, attempt=1)
    kind, data = machine.outcome(step, False, result=b"r")
    record(view, kind, **data)


def test_happy_path_runs_steps_in_order_then_completes() -> None:
    view = start()
    assert machine.decide(view, 0) == Invoke(0, False, 1)
    succeed(view, "a")
    assert machine.decide(view, 0) == Invoke(1, False, 1)
    succeed(view, "b")
    succeed(view, "c")
    decision = machine.decide(view, 0)
    assert decision == Record(((machine.SAGA_COMPLETED, {}),))
    record(view, machine.SAGA_COMPLETED)
    assert view.state == pb.SAGA_STATE_COMPLETED and machine.decide(view, 0) == Finished()


def test_unrecorded_outcome_is_invoked_again() -> None:
    view = start()
    record(view, machine.STEP_STARTED, step="a", attempt=1)
    assert machine.decide(view, 5) == Invoke(0, False, 2)  # after a crash: same step, same key


def test_retryable_failure_backs_off_then_gives_up_and_compensates() -> None:
    view = start()
    succeed(view, "a")
    record(view, machine.STEP_STARTED, step="b")
    record(view, machine.STEP_ATTEMPT_FAILED, now=10.0, step="b", code=14, error="UNAVAILABLE: x")
    assert machine.decide(view, 10.0) == Invoke(1, False, 2, pytest.approx(0.1))  # type: ignore[arg-type]
    assert machine.decide(view, 11.0) == Invoke(1, False, 2, 0.0)
    for attempt in (2, 3):
        record(view, machine.STEP_STARTED, step="b")
        record(view, machine.STEP_ATTEMPT_FAILED, now=20.0, step="b", code=14, error="UNAVAILABLE: x")
        del attempt
    decision = machine.decide(view, 30.0)
    assert isinstance(decision, Record)
    assert [kind for kind, _ in decision.events] == [machine.STEP_FAILED, machine.SAGA_COMPENSATING]


def test_non_retryable_failure_compensates_in_reverse_order() -> None:
    view = start()
    succeed(view, "a")
    succeed(view, "b")
    record(view, machine.STEP_STARTED, step="c")
    record(view, machine.STEP_ATTEMPT_FAILED, step="c", code=9, error="FAILED_PRECONDITION: no")
    decision = machine.decide(view, 2)
    assert isinstance(decision, Record)
    for kind, data in decision.events:
        record(view, kind, **data)
    assert view.state == pb.SAGA_STATE_COMPENSATING
    assert machine.decide(view, 2) == Invoke(1, True, 1)  # c failed cleanly: b first
    record(view, machine.COMPENSATION_STARTED, step="b")
    record(view, machine.COMPENSATION_SUCCEEDED, step="b")
    assert machine.decide(view, 2) == Invoke(0, True, 1)
    record(view, machine.COMPENSATION_STARTED, step="a")
    record(view, machine.COMPENSATION_SUCCEEDED, step="a")
    assert machine.decide(view, 2) == Record(((machine.SAGA_COMPENSATED, {}),))


def test_ambiguous_failure_is_compensated_too() -> None:
    view = start()
    succeed(view, "a")
    record(view, machine.STEP_STARTED, step="b")
    record(view, machine.STEP_ATTEMPT_FAILED, step="b", code=4, error="DEADLINE_EXCEEDED")
    record(view, machine.STEP_FAILED, step="b")
    record(view, machine.SAGA_COMPENSATING, reason="x")
    assert machine.decide(view, 2) == Invoke(1, True, 1)


def test_compensation_that_fails_for_good_parks_the_saga() -> None:
    defn = definition()
    defn.steps[0].compensation_retry.max_attempts = 2
    view = start(defn)
    succeed(view, "a")
    record(view, machine.ABORT_REQUESTED, reason="stop")
    assert view.state == pb.SAGA_STATE_ABORTING
    for _ in range(2):
        record(view, machine.COMPENSATION_STARTED, step="a")
        record(view, machine.COMPENSATION_ATTEMPT_FAILED, step="a", code=14, error="down")
    decision = machine.decide(view, 100)
    assert isinstance(decision, Record)
    assert [k for k, _ in decision.events] == [machine.COMPENSATION_FAILED, machine.SAGA_FAILED_COMPENSATION]
    for kind, data in decision.events:
        record(view, kind, **data)
    assert view.state == pb.SAGA_STATE_FAILED_COMPENSATION and view.finished


def test_abort_with_nothing_completed_ends_aborted() -> None:
    view = start()
    record(view, machine.ABORT_REQUESTED, reason="stop")
    assert machine.decide(view, 0) == Record(((machine.SAGA_ABORTED, {}),))


def test_request_copies_fields_from_input_and_earlier_results() -> None:
    defn = definition()
    defn.steps[1].request.base = wrappers_pb2.StringValue(value="base").SerializeToString()
    defn.steps[1].request.fields.add(source="a", source_field=1, target_field=1)
    view = start(defn)
    record(view, machine.STEP_STARTED, step="a")
    result = wrappers_pb2.StringValue(value="from-a").SerializeToString()
    kind, data = machine.outcome("a", False, result=result)
    record(view, kind, **data)
    request = machine.request_for(view, 1, compensation=False)
    assert wrappers_pb2.StringValue.FromString(request).value == "from-a"


def test_idempotency_keys_are_stable_per_phase() -> None:
    assert machine.idempotency_key("s", "a", False) == "s/a/execute"
    assert machine.idempotency_key("s", "a", True) == "s/a/compensate"
    assert machine.transition_kind("StepAttemptFailed") == "step_attempt_failed"


def test_unsent_failures_back_off_without_using_up_attempts() -> None:
    view = start(definition(attempts=1))
    for number in range(1, 4):
        record(view, machine.STEP_STARTED, step="a")
        kind, data = machine.outcome("a", False, result=None, code=14, error="no instance", sent=False)
        assert data["sent"] is False
        record(view, kind, now=10.0, **data)
        decision = machine.decide(view, 10.0)
        assert isinstance(decision, Invoke) and decision.step == 0 and not decision.compensation
        assert decision.delay == pytest.approx(0.1 * 2 ** (number - 1))
    assert view.steps[0].failures == 0 and view.steps[0].unsent_failures == 3
    assert not machine.needs_compensation(view, 0)  # never reached the participant
    record(view, machine.STEP_STARTED, step="a")
    record(view, machine.STEP_ATTEMPT_FAILED, step="a", code=14, error="UNAVAILABLE: busy")
    decision = machine.decide(view, 100.0)
    assert isinstance(decision, Record)  # the one sent attempt (max_attempts=1) was spent
    assert decision.events[0][0] == machine.STEP_FAILED


def test_unsent_failures_are_capped() -> None:
    view = start()
    for _ in range(machine.MAX_UNSENT_ATTEMPTS):
        record(view, machine.STEP_STARTED, step="a")
        record(view, machine.STEP_ATTEMPT_FAILED, step="a", code=14, error="down", sent=False)
    decision = machine.decide(view, 1e9)
    assert isinstance(decision, Record) and decision.events[0][0] == machine.STEP_FAILED


def test_unsent_compensation_failures_do_not_park_the_saga() -> None:
    defn = definition()
    defn.steps[0].compensation_retry.max_attempts = 1
    view = start(defn)
    succeed(view, "a")
    record(view, machine.ABORT_REQUESTED, reason="stop")
    record(view, machine.COMPENSATION_STARTED, step="a")
    record(view, machine.COMPENSATION_ATTEMPT_FAILED, step="a", code=14, error="breaker open", sent=False)
    decision = machine.decide(view, 100)
    assert isinstance(decision, Invoke) and decision.compensation and decision.attempt == 2


def test_an_earlier_ambiguous_attempt_still_needs_compensation() -> None:
    view = start()
    record(view, machine.STEP_STARTED, step="a")
    record(view, machine.STEP_ATTEMPT_FAILED, step="a", code=4, error="DEADLINE_EXCEEDED")
    record(view, machine.STEP_STARTED, step="a")
    record(view, machine.STEP_ATTEMPT_FAILED, step="a", code=9, error="FAILED_PRECONDITION")
    assert machine.needs_compensation(view, 0)


def test_the_starting_identity_is_recorded_and_folded() -> None:
    definition = pb.SagaDefinition(name="d")
    first = machine.started_event(
        saga_id="s",
        definition=definition,
        input_data=b"",
        idempotency_key="",
        trace_context={},
        correlation_id="c",
        labels={},
        now=1.0,
        started_by="orders",
    )
    assert machine.fold([first]).started_by == "orders"
    # Sagas recorded before the field existed fold with no starter.
    del first.data["started_by"]
    assert machine.fold([first]).started_by == ""
