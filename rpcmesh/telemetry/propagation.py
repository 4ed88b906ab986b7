"""W3C trace context, baggage and the correlation id in gRPC metadata and message headers.

rpcmesh uses its own fixed W3C propagator (``traceparent``, ``tracestate``, ``baggage``)
rather than the process-global one, so what travels between rpcmesh peers does not
depend on ``OTEL_PROPAGATORS``. The correlation id travels twice: as the baggage entry
``rpcmesh.correlation_id`` and as the plain ``x-correlation-id`` key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from rpcmesh.telemetry.correlation import (
    CORRELATION_BAGGAGE_KEY,
    CORRELATION_METADATA_KEY,
    choose_correlation_id,
)

BAGGAGE_PROPAGATOR = W3CBaggagePropagator()
"""The baggage half of ``PROPAGATOR`` (used when baggage carries more than the correlation id)."""

PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), BAGGAGE_PROPAGATOR])
"""The propagator rpcmesh injects and extracts with."""

PROPAGATED_KEYS = frozenset({"traceparent", "tracestate", "baggage", CORRELATION_METADATA_KEY})
"""Metadata keys rpcmesh writes; ``inject_metadata`` replaces them rather than adding duplicates."""

Metadata = Sequence[tuple[str, Any]]


def context_with_correlation(correlation: str, context: Context | None = None) -> Context:
    """``context`` (default: the current one) with the correlation id in its baggage."""
    return baggage.set_baggage(CORRELATION_BAGGAGE_KEY, correlation, context=context)


def inject_carrier(
    carrier: MutableMapping[str, str], correlation: str | None, context: Context | None = None
) -> None:
    """Write trace context, baggage and the correlation id of ``context`` into ``carrier``."""
    if correlation is not None:
        context = context_with_correlation(correlation, context)
        carrier[CORRELATION_METADATA_KEY] = correlation
    PROPAGATOR.inject(carrier, context=context)


def extract_carrier(carrier: Mapping[str, str]) -> tuple[Context, str]:
    """Read a carrier: the remote context (parent span, baggage) and the correlation id to adopt.

    The id comes from ``x-correlation-id``, else from baggage; a new one is made when the
    caller sent none (this is the "first hop"). The returned context carries the chosen
    id in its baggage, so calls made under it pass the id on.
    """
    context = PROPAGATOR.extract(carrier)
    from_baggage = baggage.get_baggage(CORRELATION_BAGGAGE_KEY, context)
    correlation = choose_correlation_id(
        carrier.get(CORRELATION_METADATA_KEY), from_baggage if isinstance(from_baggage, str) else None
    )
    return context_with_correlation(correlation, context), correlation


def inject_metadata(
    metadata: Iterable[tuple[str, Any]] | None, correlation: str | None = None
) -> list[tuple[str, Any]]:
    """A copy of ``metadata`` carrying the current trace context and correlation id.

    Existing propagation entries are replaced. The client stack calls this once per
    attempt inside ``attempt_span`` so each server span is a child of its attempt.

    Args:
        metadata: The call's metadata (never modified).
        correlation: The id to send; the current one (``correlation_id()``) when None.
    """
    from rpcmesh.telemetry.correlation import correlation_id

    carrier: dict[str, str] = {}
    inject_carrier(carrier, correlation or correlation_id())
    kept = [(k, v) for k, v in (metadata or ()) if k not in PROPAGATED_KEYS]
    kept.extend(carrier.items())
    return kept


def attach(context: Context) -> object:
    """Make ``context`` current; returns the token for ``detach``."""
    return otel_context.attach(context)


def detach(token: object) -> None:
    """Undo ``attach``."""
    otel_context.detach(token)  # type: ignore[arg-type]
