"""Saga events as EventStore records, and sagas as wire messages (pure).

A saga's transitions live in its own stream (``saga-<id>``), definitions in
``sagadef-<name>``; each transition is one JSON event whose body carries the
time. :func:`view_to_proto` turns a folded :class:`~rpcmesh.controlplane.saga.machine.SagaView`
into the ``rpcmesh.v1.Saga`` message.
"""

from __future__ import annotations

import itertools
import json
import uuid
from typing import Any

from google.protobuf.message import DecodeError

from rpcmesh.controlplane.eventstore.model import (
    DEFINITION_STREAM_PREFIX,
    SAGA_STREAM_PREFIX,
    NewEvent,
    StoredEvent,
    compact_json,
)
from rpcmesh.controlplane.saga.machine import SagaEvent, SagaView
from rpcmesh.v1 import saga_pb2 as pb

__all__ = [
    "DEFINITION_REGISTERED",
    "DEFINITION_STREAM_PREFIX",
    "SAGA_STREAM_PREFIX",
    "UNREADABLE",
    "event_data",
    "from_stored",
    "saga_id_for_key",
    "saga_stream",
    "to_stored",
    "view_to_proto",
]

DEFINITION_REGISTERED = "DefinitionRegistered"
UNREADABLE: tuple[type[Exception], ...] = (ValueError, KeyError, TypeError, DecodeError)
"""What reading events the coordinator did not write raises. The EventStore API refuses appends to its
streams; events written before it did are logged and skipped, so they cannot stop the coordinator."""
JSON_CONTENT_TYPE = "application/json"
_KEY_NAMESPACE = uuid.UUID("6f1c1d52-7d8e-4a8e-9a51-3b1f3c7d2e10")


def saga_stream(saga_id: str) -> str:
    """The EventStore stream of a saga."""
    return SAGA_STREAM_PREFIX + saga_id


def saga_id_for_key(idempotency_key: str) -> str:
    """Same client key, same saga id: the stream itself makes StartSaga idempotent."""
    return uuid.uuid5(_KEY_NAMESPACE, idempotency_key).hex


# Event ids: a random prefix per process plus a counter, unique without a uuid4 (a
# syscall) per event. Never derived from the revision: after a write conflict a
# different event may take that revision, and the store would drop it as a duplicate.
_ID_PREFIX = uuid.uuid4().hex
_id_counter = itertools.count(1)


def to_stored(event: SagaEvent) -> NewEvent:
    """A saga event as an EventStore event (JSON body; the time travels in the body)."""
    body = {"time": event.time, **event.data}
    return NewEvent(
        event_id=f"{_ID_PREFIX}-{next(_id_counter)}",
        event_type=event.kind,
        data=compact_json(body).encode(),
        content_type=JSON_CONTENT_TYPE,
    )


def from_stored(event: StoredEvent) -> SagaEvent:
    """Inverse of :func:`to_stored`."""
    body = json.loads(event.data)
    when = float(body.pop("time", event.recorded_at))
    return SagaEvent(event.event_type, body, when)


def view_to_proto(view: SagaView) -> pb.Saga:
    """A saga as the wire message."""
    saga = pb.Saga(
        saga_id=view.saga_id,
        definition_name=view.definition.name,
        definition_version=view.definition.version,
        state=view.state,  # type: ignore[arg-type]
        input=view.input,
        idempotency_key=view.idempotency_key,
        trace_context=view.trace_context,
        correlation_id=view.correlation_id,
        error=view.error,
        labels=view.labels,
    )
    saga.started_at.FromNanoseconds(int(view.started_at * 1e9))
    saga.updated_at.FromNanoseconds(int(view.updated_at * 1e9))
    if view.ended_at:
        saga.ended_at.FromNanoseconds(int(view.ended_at * 1e9))
    for step in view.steps:
        state = step.state
        if view.finished and state == pb.STEP_STATE_PENDING:
            state = pb.STEP_STATE_SKIPPED
        execution = pb.StepExecution(
            name=step.name,
            state=state,  # type: ignore[arg-type]
            attempts=step.attempts,
            compensation_attempts=step.compensation_attempts,
            result=step.result,
            error=step.error,
        )
        if step.started_at:
            execution.started_at.FromNanoseconds(int(step.started_at * 1e9))
        if step.ended_at:
            execution.ended_at.FromNanoseconds(int(step.ended_at * 1e9))
        saga.steps.append(execution)
    for action in view.operator_actions:
        recorded = saga.operator_actions.add(
            kind=action.kind, identity=action.identity, reason=action.reason, step=action.step
        )
        recorded.time.FromNanoseconds(int(action.time * 1e9))
    return saga


def event_data(event: SagaEvent) -> dict[str, Any]:
    """The body of an event (for transitions)."""
    return dict(event.data)
