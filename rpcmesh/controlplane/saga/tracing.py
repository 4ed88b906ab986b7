"""Trace context, correlation id and spans around saga step calls and compensations.

A saga stores the trace context (``traceparent``, ``tracestate``, ``baggage``) and the
correlation id it was started with. Every step call and compensation runs under
:func:`step_scope`, which makes them current again, in the first coordinator process as in
one started after a crash, so participants' spans join the trace the saga was started in.

With tracing on, each call gets an INTERNAL span (``saga.step reserve``,
``saga.compensate reserve``) whose parent is the stored context; the mesh's call span and
its CLIENT attempt spans nest under it, and the mesh's attempt tracing writes
``traceparent``/``baggage``/``x-correlation-id`` for each attempt (so the stored
``traceparent`` is not sent as well). With tracing off only the correlation id is made
current (one contextvar write) and the engine sends the stored headers explicitly, so
participants without OpenTelemetry and later hops still receive them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from rpcmesh.controlplane.saga.invoker import TRACE_KEYS
from rpcmesh.controlplane.saga.machine import SagaView
from rpcmesh.telemetry import (
    CORRELATION_ATTRIBUTE,
    CORRELATION_METADATA_KEY,
    Telemetry,
    capture_trace_context,
    correlation_id,
    extract_message_context,
    new_correlation_id,
    use_correlation_id,
)
from rpcmesh.telemetry.correlation import is_valid_correlation_id

__all__ = [
    "ATTEMPT_ATTRIBUTE",
    "DEFINITION_ATTRIBUTE",
    "OUTCOME_ATTRIBUTE",
    "PHASE_ATTRIBUTE",
    "SAGA_ID_ATTRIBUTE",
    "SERVICE_ATTRIBUTE",
    "STEP_ATTRIBUTE",
    "StepSpan",
    "saga_correlation_id",
    "saga_outcome",
    "start_context",
    "step_outcome",
    "step_scope",
    "stored_context",
    "trace_headers",
]

SAGA_ID_ATTRIBUTE = "rpcmesh.saga.id"
DEFINITION_ATTRIBUTE = "rpcmesh.saga.definition"
STEP_ATTRIBUTE = "rpcmesh.saga.step"
PHASE_ATTRIBUTE = "rpcmesh.saga.phase"
ATTEMPT_ATTRIBUTE = "rpcmesh.saga.attempt"
OUTCOME_ATTRIBUTE = "rpcmesh.saga.outcome"
SERVICE_ATTRIBUTE = "rpcmesh.service"


def saga_correlation_id(view: SagaView) -> str:
    """The saga's correlation id; the saga id for sagas recorded without one (stable across steps)."""
    return view.correlation_id or view.saga_id


def stored_context(view: SagaView) -> dict[str, str]:
    """The carrier ``use_trace_context`` reads: stored trace headers plus the correlation id."""
    return {**view.trace_context, CORRELATION_METADATA_KEY: saga_correlation_id(view)}


def step_outcome(*, code: int, sent: bool) -> str:
    """``succeeded``, ``failed`` (the participant may have seen it) or ``not_sent``."""
    if code == 0:
        return "succeeded"
    return "failed" if sent else "not_sent"


def saga_outcome(state_name: str) -> str:
    """``SAGA_STATE_COMPLETED`` → ``completed`` (the metrics' outcome label)."""
    return state_name.removeprefix("SAGA_STATE_").lower()


class StepSpan:
    """The span of one step call or compensation; every method is a no-op when tracing is off."""

    __slots__ = ("span",)

    def __init__(self, span: Span | None) -> None:
        self.span = span

    def finish(self, *, code: int, error: str, sent: bool) -> None:
        """Record the call's outcome (gRPC status code as an integer) on the span."""
        span = self.span
        if span is None:
            return
        span.set_attribute(OUTCOME_ATTRIBUTE, step_outcome(code=code, sent=sent))
        span.set_attribute("rpc.grpc.status_code", code)
        if code != 0:
            span.set_status(Status(StatusCode.ERROR, error))


_OFF = StepSpan(None)


@contextlib.contextmanager
def step_scope(
    view: SagaView,
    *,
    step: str,
    service: str,
    compensation: bool,
    attempt: int,
    telemetry: Telemetry,
) -> Iterator[StepSpan]:
    """Run one step call or compensation under the saga's stored trace context and correlation id.

    Args:
        view: The saga (its stored trace context and correlation id).
        step: The step's name.
        service: The participant service called.
        compensation: Whether this is the compensation.
        attempt: The saga's attempt number of this call (1 for the first).
        telemetry: Where spans go; with tracing off only the correlation id becomes current.

    Yields:
        The step's span holder; call :meth:`StepSpan.finish` with the outcome.
    """
    if not telemetry.tracing:
        with use_correlation_id(saga_correlation_id(view)):
            yield _OFF
        return
    message = extract_message_context(stored_context(view))
    phase = "compensate" if compensation else "execute"
    attributes: dict[str, Any] = {
        SAGA_ID_ATTRIBUTE: view.saga_id,
        DEFINITION_ATTRIBUTE: view.definition.name,
        STEP_ATTRIBUTE: step,
        PHASE_ATTRIBUTE: phase,
        ATTEMPT_ATTRIBUTE: attempt,
        SERVICE_ATTRIBUTE: service,
        CORRELATION_ATTRIBUTE: message.correlation_id,
    }
    name = f"saga.{'compensate' if compensation else 'step'} {step}"
    span = telemetry.tracer.start_span(
        name, context=message.context, kind=SpanKind.INTERNAL, attributes=attributes
    )
    token = otel_context.attach(trace.set_span_in_context(span, message.context))
    try:
        with use_correlation_id(message.correlation_id):
            yield StepSpan(span)
    except BaseException as exc:
        span.set_attribute(OUTCOME_ATTRIBUTE, "cancelled" if _is_cancel(exc) else "error")
        if not _is_cancel(exc):
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        otel_context.detach(token)
        span.end()


def _is_cancel(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError)


def start_context(metadata: Mapping[str, str], telemetry: Telemetry) -> tuple[dict[str, str], str]:
    """What a new saga stores: its trace headers and correlation id, taken in the StartSaga handler.

    With tracing on and a span current (the coordinator's SERVER span of StartSaga), the steps
    become children of that span. Otherwise the caller's headers are stored as they came. The
    correlation id is the handler's (adopted from the caller, or made at this first hop), else
    the caller's ``x-correlation-id``, else a new one: every saga has one.
    """
    if telemetry.tracing and trace.get_current_span().get_span_context().is_valid:
        carrier = capture_trace_context()
        return trace_headers(carrier), carrier[CORRELATION_METADATA_KEY]
    sent = metadata.get(CORRELATION_METADATA_KEY)
    correlation = correlation_id() or (sent if is_valid_correlation_id(sent) else None)
    return trace_headers(metadata), correlation or new_correlation_id()


def trace_headers(carrier: Mapping[str, str]) -> dict[str, str]:
    """The trace entries of a carrier (what a saga stores)."""
    return {key: carrier[key] for key in TRACE_KEYS if key in carrier}
