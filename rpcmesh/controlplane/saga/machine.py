"""The saga state machine: pure, I/O-free.

A saga is the fold of the events recorded in its stream (:func:`apply`).
:func:`decide` looks at that state and the clock and says what happens next:
invoke a step or a compensation (maybe after a backoff delay), record a
transition, or nothing (finished). The engine does the I/O and records every
transition before acting on it, so replaying the stream after a crash leads to
the same decisions; a call whose outcome was not recorded is invoked again
with the same idempotency key.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rpcmesh.controlplane.saga.definition import (
    DEFAULT_COMPENSATION_ATTEMPTS,
    DEFAULT_STEP_ATTEMPTS,
    INPUT,
    RetrySettings,
    mappings,
    retry_settings,
)
from rpcmesh.controlplane.saga.wire import build_payload
from rpcmesh.saga.states import SETTLED_STATES
from rpcmesh.v1 import saga_pb2 as pb

# Event types recorded in a saga's stream.
SAGA_STARTED = "SagaStarted"
STEP_STARTED = "StepStarted"
STEP_SUCCEEDED = "StepSucceeded"
STEP_ATTEMPT_FAILED = "StepAttemptFailed"
STEP_FAILED = "StepFailed"
SAGA_COMPENSATING = "SagaCompensating"
ABORT_REQUESTED = "AbortRequested"
COMPENSATION_STARTED = "CompensationStarted"
COMPENSATION_SUCCEEDED = "CompensationSucceeded"
COMPENSATION_ATTEMPT_FAILED = "CompensationAttemptFailed"
COMPENSATION_FAILED = "CompensationFailed"
SAGA_COMPLETED = "SagaCompleted"
SAGA_COMPENSATED = "SagaCompensated"
SAGA_ABORTED = "SagaAborted"
SAGA_FAILED_COMPENSATION = "SagaFailedCompensation"
# Operator actions on a FAILED_COMPENSATION saga (RetryCompensation, ResolveSaga).
COMPENSATION_RETRY_REQUESTED = "CompensationRetryRequested"
SAGA_RESOLVED = "SagaResolved"
OPERATOR_EVENTS = frozenset({COMPENSATION_RETRY_REQUESTED, SAGA_RESOLVED})

TERMINAL = SETTLED_STATES
# A call that ended with one of these may have taken effect at the participant:
# its step is compensated like a completed one (compensations must tolerate
# "nothing to undo").
AMBIGUOUS_CODES = frozenset({1, 2, 4})  # CANCELLED, UNKNOWN, DEADLINE_EXCEEDED
# Attempts that provably never reached a participant (no instance, breaker open,
# connection refused) do not use up the RetryPolicy's max_attempts; they are
# retried with its backoff, up to this many per step or compensation.
MAX_UNSENT_ATTEMPTS = 60


@dataclass(frozen=True)
class SagaEvent:
    """One recorded transition."""

    kind: str
    data: Mapping[str, Any]
    time: float


@dataclass
class StepView:
    """What the recorded events say about one step."""

    name: str
    state: int = pb.STEP_STATE_PENDING
    attempts: int = 0
    failures: int = 0
    unsent_failures: int = 0
    last_unsent: bool = False
    maybe_applied: bool = False
    in_flight: bool = False
    last_code: int = 0
    last_failure_at: float = 0.0
    result: bytes = b""
    error: str = ""
    compensation_attempts: int = 0
    compensation_failures: int = 0
    compensation_unsent_failures: int = 0
    compensation_last_unsent: bool = False
    compensation_in_flight: bool = False
    compensation_last_code: int = 0
    compensation_last_failure_at: float = 0.0
    compensation_retry_due: bool = False
    """An operator asked for RetryCompensation: the next compensation attempt is made at once."""
    started_at: float = 0.0
    ended_at: float = 0.0


@dataclass(frozen=True)
class OperatorActionView:
    """A recorded RetryCompensation or ResolveSaga: who, when, why."""

    kind: str
    identity: str
    reason: str
    time: float
    step: str = ""


@dataclass
class SagaView:
    """A saga as the fold of its events."""

    saga_id: str
    definition: pb.SagaDefinition
    input: bytes
    idempotency_key: str
    trace_context: dict[str, str]
    correlation_id: str
    labels: dict[str, str]
    started_at: float
    started_by: str = ""
    """The authenticated identity that started the saga ("" with authentication off)."""
    state: int = pb.SAGA_STATE_RUNNING
    error: str = ""
    updated_at: float = 0.0
    ended_at: float = 0.0
    steps: list[StepView] = field(default_factory=list)
    cause: str = ""
    """Why the saga compensates (step failure or abort reason): its error again after a retry."""
    aborted: bool = False
    operator_actions: list[OperatorActionView] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Whether the saga reached a terminal state."""
        return self.state in TERMINAL

    def step_index(self, name: str) -> int:
        """Position of a step by name."""
        for index, step in enumerate(self.steps):
            if step.name == name:
                return index
        raise KeyError(name)


def b64(data: bytes) -> str:
    """Bytes as JSON-safe text."""
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    """Inverse of :func:`b64`."""
    return base64.b64decode(text.encode())


def started_event(
    *,
    saga_id: str,
    definition: pb.SagaDefinition,
    input_data: bytes,
    idempotency_key: str,
    trace_context: Mapping[str, str],
    correlation_id: str,
    labels: Mapping[str, str],
    now: float,
    encoded_definition: str | None = None,
    started_by: str = "",
) -> SagaEvent:
    """The first event of a saga: everything needed to run it, including its definition.

    ``encoded_definition``: ``b64(definition.SerializeToString())`` when the caller has it already.
    """
    return SagaEvent(
        SAGA_STARTED,
        {
            "saga_id": saga_id,
            "definition": encoded_definition or b64(definition.SerializeToString()),
            "input": b64(input_data),
            "idempotency_key": idempotency_key,
            "trace_context": dict(trace_context),
            "correlation_id": correlation_id,
            "labels": dict(labels),
            "started_by": started_by,
        },
        now,
    )


def fold(events: Iterable[SagaEvent], definition: pb.SagaDefinition | None = None) -> SagaView:
    """The saga recorded by ``events`` (the first must be SagaStarted).

    ``definition``: the one SagaStarted records, when the caller has it (not decoded again).
    """
    iterator = iter(events)
    first = next(iterator)
    if first.kind != SAGA_STARTED:
        raise ValueError(f"a saga stream starts with {SAGA_STARTED}, not {first.kind}")
    data = first.data
    if definition is None:
        definition = pb.SagaDefinition.FromString(unb64(data["definition"]))
    view = SagaView(
        saga_id=data["saga_id"],
        definition=definition,
        input=unb64(data["input"]),
        idempotency_key=data["idempotency_key"],
        trace_context=dict(data["trace_context"]),
        correlation_id=data["correlation_id"],
        labels=dict(data["labels"]),
        started_at=first.time,
        started_by=data.get("started_by", ""),
        updated_at=first.time,
        steps=[StepView(name=step.name) for step in definition.steps],
    )
    for event in iterator:
        apply(view, event)
    return view


def apply(view: SagaView, event: SagaEvent) -> None:
    """Advance ``view`` by one recorded event."""
    view.updated_at = event.time
    data = event.data
    kind = event.kind
    step = view.steps[view.step_index(data["step"])] if "step" in data else None
    if kind == STEP_STARTED and step:
        step.state = pb.STEP_STATE_RUNNING
        step.attempts += 1
        step.in_flight = True
        step.started_at = step.started_at or event.time
    elif kind == STEP_SUCCEEDED and step:
        step.state = pb.STEP_STATE_SUCCEEDED
        step.in_flight = False
        step.result = unb64(data["result"])
        step.error = ""
        step.ended_at = event.time
    elif kind == STEP_ATTEMPT_FAILED and step:
        step.in_flight = False
        step.last_code = int(data["code"])
        step.last_unsent = not data.get("sent", True)
        if step.last_unsent:
            step.unsent_failures += 1
        else:
            step.failures += 1
            step.maybe_applied = step.maybe_applied or step.last_code in AMBIGUOUS_CODES
        step.last_failure_at = event.time
        step.error = data["error"]
    elif kind == STEP_FAILED and step:
        step.state = pb.STEP_STATE_FAILED
        step.ended_at = event.time
    elif kind == SAGA_COMPENSATING:
        view.state = pb.SAGA_STATE_COMPENSATING
        view.error = view.cause = data.get("reason", "")
    elif kind == ABORT_REQUESTED:
        view.state = pb.SAGA_STATE_ABORTING
        view.error = view.cause = data.get("reason", "") or "aborted"
        view.aborted = True
    elif kind in OPERATOR_EVENTS:
        _apply_operator(view, event, step)
    elif kind == COMPENSATION_STARTED and step:
        step.state = pb.STEP_STATE_COMPENSATING
        step.compensation_attempts += 1
        step.compensation_in_flight = True
        step.compensation_retry_due = False
    elif kind == COMPENSATION_SUCCEEDED and step:
        step.state = pb.STEP_STATE_COMPENSATED
        step.compensation_in_flight = False
        step.ended_at = event.time
    elif kind == COMPENSATION_ATTEMPT_FAILED and step:
        step.compensation_in_flight = False
        step.compensation_last_code = int(data["code"])
        step.compensation_last_unsent = not data.get("sent", True)
        if step.compensation_last_unsent:
            step.compensation_unsent_failures += 1
        else:
            step.compensation_failures += 1
        step.compensation_last_failure_at = event.time
        step.error = data["error"]
    elif kind == COMPENSATION_FAILED and step:
        step.state = pb.STEP_STATE_COMPENSATION_FAILED
        step.ended_at = event.time
    elif kind in _FINAL_STATES:
        view.state = _FINAL_STATES[kind]
        view.ended_at = event.time
        if data.get("reason"):
            view.error = data["reason"]


def _apply_operator(view: SagaView, event: SagaEvent, step: StepView | None) -> None:
    """RetryCompensation: back to compensating, the failed step with a fresh budget. ResolveSaga: closed."""
    data = event.data
    action = "retry_compensation" if event.kind == COMPENSATION_RETRY_REQUESTED else "resolve"
    view.operator_actions.append(
        OperatorActionView(
            action, data.get("by", ""), data.get("reason", ""), event.time, data.get("step", "")
        )
    )
    if event.kind == SAGA_RESOLVED:
        view.state = pb.SAGA_STATE_RESOLVED_MANUALLY
        view.ended_at = event.time
        return
    view.state = pb.SAGA_STATE_ABORTING if view.aborted else pb.SAGA_STATE_COMPENSATING
    view.error = view.cause
    view.ended_at = 0.0
    if step is not None:
        step.state = pb.STEP_STATE_COMPENSATING
        step.ended_at = 0.0
        step.compensation_failures = 0
        step.compensation_unsent_failures = 0
        step.compensation_last_unsent = False
        step.compensation_retry_due = True


def failed_compensation_step(view: SagaView) -> str:
    """The step whose compensation failed for good ("" when none did)."""
    for step in view.steps:
        if step.state == pb.STEP_STATE_COMPENSATION_FAILED:
            return step.name
    return ""


_FINAL_STATES = {
    SAGA_COMPLETED: pb.SAGA_STATE_COMPLETED,
    SAGA_COMPENSATED: pb.SAGA_STATE_COMPENSATED,
    SAGA_ABORTED: pb.SAGA_STATE_ABORTED,
    SAGA_FAILED_COMPENSATION: pb.SAGA_STATE_FAILED_COMPENSATION,
}


@dataclass(frozen=True)
class Invoke:
    """Call a step (or its compensation), after ``delay`` seconds."""

    step: int
    compensation: bool
    attempt: int
    delay: float = 0.0


@dataclass(frozen=True)
class Record:
    """Record transitions (kind, data) that need no call."""

    events: tuple[tuple[str, dict[str, Any]], ...]


@dataclass(frozen=True)
class Finished:
    """Nothing more to do."""


Decision = Invoke | Record | Finished


def needs_compensation(view: SagaView, index: int) -> bool:
    """Whether a step may have taken effect and has a compensation."""
    step = view.steps[index]
    if view.definition.steps[index].no_compensation:
        return False
    if step.state in (
        pb.STEP_STATE_SUCCEEDED,
        pb.STEP_STATE_COMPENSATING,
        pb.STEP_STATE_COMPENSATED,
        pb.STEP_STATE_COMPENSATION_FAILED,
    ):
        return True
    # Any attempt that ended ambiguously may have taken effect, even if a later one failed cleanly.
    return step.in_flight or step.maybe_applied


def decide(view: SagaView, now: float) -> Decision:
    """The next thing to do for this saga."""
    if view.finished:
        return Finished()
    if view.state == pb.SAGA_STATE_RUNNING:
        return _decide_forward(view, now)
    return _decide_compensation(view, now)


def _decide_forward(view: SagaView, now: float) -> Decision:
    for index, step in enumerate(view.steps):
        if step.state == pb.STEP_STATE_SUCCEEDED:
            continue
        if step.in_flight or step.attempts == 0:
            return Invoke(index, False, step.attempts + 1)
        policy = retry_settings(view.definition.steps[index].retry, DEFAULT_STEP_ATTEMPTS)
        if _may_retry(policy, step.last_code, step.last_unsent, step.failures, step.unsent_failures):
            backoff = policy.backoff(step.failures + step.unsent_failures)
            delay = max(0.0, step.last_failure_at + backoff - now)
            return Invoke(index, False, step.attempts + 1, delay)
        reason = f"step {step.name!r} failed: {step.error}"
        return Record(((STEP_FAILED, {"step": step.name}), (SAGA_COMPENSATING, {"reason": reason})))
    return Record(((SAGA_COMPLETED, {}),))


def _may_retry(policy: RetrySettings, code: int, unsent: bool, failures: int, unsent_failures: int) -> bool:
    """Retry eligibility: unsent attempts have their own cap; the rest obey the RetryPolicy."""
    if unsent:
        return unsent_failures < MAX_UNSENT_ATTEMPTS
    return policy.retryable(code) and failures < policy.max_attempts


def _decide_compensation(view: SagaView, now: float) -> Decision:
    for index in reversed(range(len(view.steps))):
        step = view.steps[index]
        if step.state == pb.STEP_STATE_COMPENSATED or not needs_compensation(view, index):
            continue
        if step.compensation_in_flight or step.compensation_attempts == 0 or step.compensation_retry_due:
            return Invoke(index, True, step.compensation_attempts + 1)
        policy = retry_settings(
            view.definition.steps[index].compensation_retry, DEFAULT_COMPENSATION_ATTEMPTS
        )
        if _may_retry(
            policy,
            step.compensation_last_code,
            step.compensation_last_unsent,
            step.compensation_failures,
            step.compensation_unsent_failures,
        ):
            backoff = policy.backoff(step.compensation_failures + step.compensation_unsent_failures)
            delay = max(0.0, step.compensation_last_failure_at + backoff - now)
            return Invoke(index, True, step.compensation_attempts + 1, delay)
        reason = f"compensation of step {step.name!r} failed: {step.error}"
        return Record(
            ((COMPENSATION_FAILED, {"step": step.name}), (SAGA_FAILED_COMPENSATION, {"reason": reason}))
        )
    final = SAGA_ABORTED if view.state == pb.SAGA_STATE_ABORTING else SAGA_COMPENSATED
    return Record(((final, {}),))


def started_kind(compensation: bool) -> str:
    """Event type recorded before a call."""
    return COMPENSATION_STARTED if compensation else STEP_STARTED


def outcome(
    step: str, compensation: bool, *, result: bytes | None, code: int = 0, error: str = "", sent: bool = True
) -> tuple[str, dict[str, Any]]:
    """The event recording a call's outcome: its result, or its status code and message.

    ``sent=False`` marks a failure that provably never reached a participant.
    """
    if result is not None:
        if compensation:
            return COMPENSATION_SUCCEEDED, {"step": step}
        return STEP_SUCCEEDED, {"step": step, "result": b64(result)}
    kind = COMPENSATION_ATTEMPT_FAILED if compensation else STEP_ATTEMPT_FAILED
    data: dict[str, Any] = {"step": step, "code": code, "error": error}
    if not sent:
        data["sent"] = False
    return kind, data


def idempotency_key(saga_id: str, step: str, compensation: bool) -> str:
    """Stable per saga, step and phase: a re-invocation after a crash reuses it."""
    return f"{saga_id}/{step}/{'compensate' if compensation else 'execute'}"


def request_for(view: SagaView, index: int, compensation: bool) -> bytes:
    """Build the request of a step or compensation from its template."""
    step = view.definition.steps[index]
    template = (
        step.compensation_request if compensation and step.HasField("compensation_request") else step.request
    )
    sources = {INPUT: view.input}
    sources.update({s.name: s.result for s in view.steps})
    return build_payload(template.base, template.base_from, mappings(template), sources)


def transition_kind(event_kind: str) -> str:
    """snake_case name of an event type, as WatchSaga reports it."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in event_kind).lstrip("_")
