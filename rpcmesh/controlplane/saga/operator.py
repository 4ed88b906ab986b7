"""Operator verbs on a saga stuck in FAILED_COMPENSATION: RetryCompensation and ResolveSaga.

Each is one event appended to the saga's stream at the revision this node read
(``CompensationRetryRequested`` or ``SagaResolved``, with the caller's identity,
the reason and the time), exactly as AbortSaga records ``AbortRequested``. Any
node accepts the call; only the node driving the sagas acts on it: on one node
(SQLite) that is this engine, which starts a runner for the saga again; on a
shared PostgreSQL store the driving node reads these event types from the log
(it is nudged at once) and resumes the saga. A coordinator killed right after
the event was acknowledged finds the saga COMPENSATING in its stream when it
starts and resumes it like any unfinished saga.

The state change itself is the pure fold in :mod:`~rpcmesh.controlplane.saga.machine`
(``_apply_operator``): a retry takes the saga back to COMPENSATING (ABORTING for an
aborted saga) with a fresh attempt budget for the failed compensation, which is then
called again at once with the same idempotency key; a resolve ends the saga in the
terminal RESOLVED_MANUALLY.
"""

from __future__ import annotations

from rpcmesh.controlplane.saga import machine
from rpcmesh.controlplane.saga.engine import SagaEngine
from rpcmesh.controlplane.saga.machine import SagaEvent, SagaView
from rpcmesh.v1 import saga_pb2 as pb

__all__ = ["MAX_REASON", "resolve_saga", "retry_compensation"]

MAX_REASON = 1024
"""Longest reason an operator action records, in characters."""


async def retry_compensation(engine: SagaEngine, saga_id: str, *, reason: str, by: str) -> SagaView:
    """Record CompensationRetryRequested; the driving node compensates again from the failed step.

    Raises:
        NotFoundError: no such saga.
        FailedPreconditionError: the saga is not FAILED_COMPENSATION.
    """
    return await _record(engine, saga_id, machine.COMPENSATION_RETRY_REQUESTED, reason=reason, by=by)


async def resolve_saga(engine: SagaEngine, saga_id: str, *, reason: str, by: str) -> SagaView:
    """Record SagaResolved: the saga ends RESOLVED_MANUALLY.

    Raises:
        NotFoundError: no such saga.
        FailedPreconditionError: the saga is not FAILED_COMPENSATION.
    """
    return await _record(engine, saga_id, machine.SAGA_RESOLVED, reason=reason, by=by)


async def _record(engine: SagaEngine, saga_id: str, kind: str, *, reason: str, by: str) -> SagaView:
    verb = "retried" if kind == machine.COMPENSATION_RETRY_REQUESTED else "resolved"

    def refusal(view: SagaView) -> str | None:
        if view.state == pb.SAGA_STATE_FAILED_COMPENSATION:
            return None
        state = pb.SagaState.Name(pb.SagaState.ValueType(view.state))
        return f"saga_id: saga {saga_id} is {state}; only a SAGA_STATE_FAILED_COMPENSATION saga can be {verb}"

    def event(view: SagaView) -> SagaEvent:
        data = {"reason": reason, "by": by}
        step = machine.failed_compensation_step(view)
        if kind == machine.COMPENSATION_RETRY_REQUESTED and step:
            data["step"] = step
        return SagaEvent(kind, data, engine.clock())

    return await engine.record_request(saga_id, refusal, event)
