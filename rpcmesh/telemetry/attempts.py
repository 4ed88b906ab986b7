"""What the client stack calls to make retries, hedges and breaker decisions visible.

The tracing interceptor is the outermost one, so while the retry/hedge/breaker layers run
the call's CLIENT span is current. ``record_attempt`` and ``record_breaker_rejection``
add span events to it (cheap) and count in the metrics; ``attempt_span`` opens a child
span per attempt when each attempt should be a span of its own (then send the metadata
from ``inject_metadata`` so the server span hangs under the attempt).
All of them are no-ops with telemetry off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from rpcmesh.telemetry.correlation import CORRELATION_ATTRIBUTE, correlation_id
from rpcmesh.telemetry.setup import Telemetry, get_telemetry

ATTEMPT_EVENT = "rpcmesh.attempt"
"""Span event name of one attempt (attributes ``rpcmesh.attempt``, ``rpcmesh.hedge``, peer, backoff)."""

BREAKER_REJECTION_EVENT = "rpcmesh.breaker.rejected"
"""Span event name of a call refused by an open breaker."""

BREAKER_TRANSITION_EVENT = "rpcmesh.breaker.transition"
"""Span event name of a breaker state change seen during a call."""


def _attempt_attributes(
    attempt: int, hedge: bool, peer: str | None, backoff_s: float | None, reason: str | None
) -> dict[str, Any]:
    attributes: dict[str, Any] = {"rpcmesh.attempt": attempt, "rpcmesh.hedge": hedge}
    if peer:
        attributes["network.peer.address"] = peer
    if backoff_s is not None:
        attributes["rpcmesh.backoff_s"] = backoff_s
    if reason:
        attributes["rpcmesh.retry_reason"] = reason
    return attributes


def record_attempt(
    attempt: int,
    *,
    service: str,
    method: str,
    hedge: bool = False,
    peer: str | None = None,
    backoff_s: float | None = None,
    reason: str | None = None,
    telemetry: Telemetry | None = None,
) -> None:
    """Record that an attempt is being sent: an event on the call span, a retry or hedge count.

    Args:
        attempt: 1 for the first attempt, 2 for the first retry or hedge, and so on.
        service: Full service name (``echo.v1.Echo``).
        method: Method name (``Echo``).
        hedge: Whether this is a hedged attempt rather than a retry.
        peer: The instance address the attempt goes to.
        backoff_s: The backoff waited before this attempt.
        reason: Why the previous attempt is retried (e.g. the status code name).
        telemetry: The handle; ``get_telemetry()`` when None.
    """
    telemetry = telemetry or get_telemetry()
    if not telemetry.active:
        return
    if telemetry.tracing:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(ATTEMPT_EVENT, _attempt_attributes(attempt, hedge, peer, backoff_s, reason))
    if hedge:
        telemetry.metrics.hedge_attempt(service, method)
    elif attempt > 1:
        telemetry.metrics.retry_attempt(service, method)


@contextlib.contextmanager
def attempt_span(
    attempt: int,
    *,
    service: str,
    method: str,
    hedge: bool = False,
    peer: str | None = None,
    telemetry: Telemetry | None = None,
) -> Iterator[Span]:
    """A child span for one attempt, current inside the block (also counts it, as ``record_attempt``).

    Inside the block build the attempt's metadata with ``inject_metadata(details.metadata)``.
    """
    telemetry = telemetry or get_telemetry()
    if hedge:
        telemetry.metrics.hedge_attempt(service, method)
    elif attempt > 1:
        telemetry.metrics.retry_attempt(service, method)
    if not telemetry.tracing:
        yield trace.INVALID_SPAN
        return
    attributes = _attempt_attributes(attempt, hedge, peer, None, None)
    attributes.update({"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
    cid = correlation_id()
    if cid is not None:
        attributes[CORRELATION_ATTRIBUTE] = cid
    with telemetry.tracer.start_as_current_span(
        f"{service}/{method} attempt {attempt}", kind=SpanKind.CLIENT, attributes=attributes
    ) as span:
        yield span


def record_breaker_rejection(
    breaker: str, *, state: str = "open", peer: str | None = None, telemetry: Telemetry | None = None
) -> None:
    """Record that a breaker refused a call: an event on the current span and a count.

    Args:
        breaker: The breaker's name (e.g. ``echo.v1.Echo`` or ``echo.v1.Echo@10.0.0.1:50051``).
        state: Its state when it refused (``open`` or ``half_open`` with no probe slot left).
        peer: The instance whose breaker refused, for per-instance breakers.
        telemetry: The handle; ``get_telemetry()`` when None.
    """
    telemetry = telemetry or get_telemetry()
    if not telemetry.active:
        return
    if telemetry.tracing:
        span = trace.get_current_span()
        if span.is_recording():
            attributes: dict[str, Any] = {"rpcmesh.breaker": breaker, "rpcmesh.breaker.state": state}
            if peer:
                attributes["network.peer.address"] = peer
            span.add_event(BREAKER_REJECTION_EVENT, attributes)
    telemetry.metrics.breaker_rejection(breaker)


def record_breaker_transition(
    breaker: str, from_state: str, to_state: str, *, telemetry: Telemetry | None = None
) -> None:
    """Record a breaker state change (``closed``, ``half_open``, ``open``): gauge, count, span event."""
    telemetry = telemetry or get_telemetry()
    if not telemetry.active:
        return
    telemetry.metrics.breaker_transition(breaker, from_state, to_state)
    if telemetry.tracing:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(
                BREAKER_TRANSITION_EVENT, {"rpcmesh.breaker": breaker, "from": from_state, "to": to_state}
            )
