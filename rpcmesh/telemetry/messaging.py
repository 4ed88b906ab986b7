"""Trace context and correlation id through Bus messages, and saga trace-context capture.

Publisher side: ``producer_span(topic, headers)`` opens a PRODUCER span and writes
``traceparent``/``baggage``/``x-correlation-id`` into the message's headers, so each
delivery, redelivery or dead-letter replay continues the same trace. Subscriber side:
``consumer_span(topic, headers, ...)`` opens a CONSUMER span as the child of the producer
span, and makes the message's correlation id current for the handler. Attributes follow
the OpenTelemetry messaging semantic conventions.

Sagas: ``capture_trace_context()`` returns a small ``dict[str, str]`` to store with the saga
at start; ``use_trace_context(stored)`` makes it current again for every step call and
compensation, also in a coordinator process started after a crash.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from rpcmesh.telemetry.correlation import (
    CORRELATION_ATTRIBUTE,
    CORRELATION_METADATA_KEY,
    correlation_id,
    new_correlation_id,
    reset_correlation_id,
    set_correlation_id,
)
from rpcmesh.telemetry.propagation import PROPAGATED_KEYS, extract_carrier, inject_carrier
from rpcmesh.telemetry.setup import Telemetry, get_telemetry

MESSAGING_SYSTEM = "rpcmesh"
"""``messaging.system`` of the embedded Bus; the NATS backend passes ``nats``."""

DELIVERY_ATTEMPT_ATTRIBUTE = "messaging.rpcmesh.delivery_attempt"
"""Span attribute: 1 for the first delivery, 2+ for redeliveries."""

DEAD_LETTER_EVENT = "rpcmesh.dead_letter"
"""Span event name when a message is moved to dead letters."""


@dataclass(frozen=True, kw_only=True)
class MessageContext:
    """What a message's headers carried.

    Attributes:
        context: The OpenTelemetry context to continue (parent span and baggage).
        correlation_id: The correlation id (new if the publisher sent none).
    """

    context: Context
    correlation_id: str


def inject_message_headers(headers: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Write the current trace context and correlation id into message headers (a new id if none).

    Returns:
        ``headers`` (or a new dict), for chaining.
    """
    headers = {} if headers is None else headers
    inject_carrier(headers, correlation_id() or new_correlation_id())
    return headers


def extract_message_context(headers: Mapping[str, str] | None) -> MessageContext:
    """Read what ``inject_message_headers`` wrote (unknown headers are ignored)."""
    carrier = {k.lower(): v for k, v in (headers or {}).items() if k.lower() in PROPAGATED_KEYS}
    context, correlation = extract_carrier(carrier)
    return MessageContext(context=context, correlation_id=correlation)


def _messaging_attributes(
    operation: str,
    operation_type: str,
    destination: str,
    system: str,
    message_id: str | None,
    correlation: str,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": system,
        "messaging.destination.name": destination,
        "messaging.operation": operation,
        "messaging.operation.name": operation,
        "messaging.operation.type": operation_type,
        CORRELATION_ATTRIBUTE: correlation,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    if extra:
        attributes.update(extra)
    return attributes


@contextlib.contextmanager
def producer_span(
    destination: str,
    headers: MutableMapping[str, str] | None = None,
    *,
    message_id: str | None = None,
    batch_size: int | None = None,
    system: str = MESSAGING_SYSTEM,
    telemetry: Telemetry | None = None,
) -> Iterator[Span]:
    """A PRODUCER span around publishing; writes trace context and correlation id into ``headers``.

    For a batch, pass one headers dict per message to ``inject_message_headers`` inside the block
    (each then points at this span) and ``batch_size``.
    """
    telemetry = telemetry or get_telemetry()
    correlation = correlation_id() or new_correlation_id()
    token = set_correlation_id(correlation)
    try:
        if not telemetry.tracing:
            if headers is not None:
                inject_carrier(headers, correlation)
            yield trace.INVALID_SPAN
            return
        extra: dict[str, Any] = {}
        if batch_size is not None:
            extra["messaging.batch.message_count"] = batch_size
        attributes = _messaging_attributes(
            "publish", "send", destination, system, message_id, correlation, extra
        )
        with telemetry.tracer.start_as_current_span(
            f"publish {destination}", kind=SpanKind.PRODUCER, attributes=attributes
        ) as span:
            if headers is not None:
                inject_carrier(headers, correlation)
            yield span
    finally:
        reset_correlation_id(token)


@contextlib.contextmanager
def consumer_span(
    destination: str,
    headers: Mapping[str, str] | None,
    *,
    message_id: str | None = None,
    consumer_group: str | None = None,
    delivery_attempt: int | None = None,
    system: str = MESSAGING_SYSTEM,
    operation: str = "process",
    telemetry: Telemetry | None = None,
) -> Iterator[Span]:
    """A CONSUMER span around handling one delivered message, continuing the publisher's trace.

    Inside the block the message's correlation id is current (``correlation_id()``), and calls the
    handler makes carry it on. An exception escaping the block marks the span as an error.
    """
    telemetry = telemetry or get_telemetry()
    message = extract_message_context(headers)
    token = set_correlation_id(message.correlation_id)
    try:
        if not telemetry.tracing:
            yield trace.INVALID_SPAN
            return
        extra: dict[str, Any] = {}
        if consumer_group:
            extra["messaging.consumer.group.name"] = consumer_group
        if delivery_attempt is not None:
            extra[DELIVERY_ATTEMPT_ATTRIBUTE] = delivery_attempt
        attributes = _messaging_attributes(
            operation, "process", destination, system, message_id, message.correlation_id, extra
        )
        context_token = otel_context.attach(message.context)
        try:
            with telemetry.tracer.start_as_current_span(
                f"{operation} {destination}", kind=SpanKind.CONSUMER, attributes=attributes
            ) as span:
                yield span
        finally:
            otel_context.detach(context_token)
    finally:
        reset_correlation_id(token)


def record_dead_letter(reason: str, *, attempts: int, dead_letter_topic: str | None = None) -> None:
    """Mark on the current (consumer) span that the message goes to dead letters."""
    span = trace.get_current_span()
    if span.is_recording():
        attributes: dict[str, Any] = {
            "rpcmesh.dead_letter.reason": reason,
            DELIVERY_ATTEMPT_ATTRIBUTE: attempts,
        }
        if dead_letter_topic:
            attributes["rpcmesh.dead_letter.topic"] = dead_letter_topic
        span.add_event(DEAD_LETTER_EVENT, attributes)
        span.set_status(Status(StatusCode.ERROR, f"dead-lettered: {reason}"))


def capture_trace_context() -> dict[str, str]:
    """The current trace context and correlation id as a small dict of strings, to store with a saga.

    A new correlation id is made when there is none, so the stored value always has one.
    """
    carrier: dict[str, str] = {}
    inject_carrier(carrier, correlation_id() or new_correlation_id())
    return carrier


@contextlib.contextmanager
def use_trace_context(stored: Mapping[str, str] | None) -> Iterator[str]:
    """Make a stored trace context and correlation id current (for a saga step call or compensation).

    Calls made inside the block are children of the span that was current at capture, and carry
    the same correlation id. Yields the correlation id.
    """
    message = extract_message_context(stored)
    context_token = otel_context.attach(message.context)
    token = set_correlation_id(message.correlation_id)
    try:
        yield message.correlation_id
    finally:
        reset_correlation_id(token)
        otel_context.detach(context_token)


__all__ = [
    "CORRELATION_METADATA_KEY",
    "DEAD_LETTER_EVENT",
    "DELIVERY_ATTEMPT_ATTRIBUTE",
    "MESSAGING_SYSTEM",
    "MessageContext",
    "capture_trace_context",
    "consumer_span",
    "extract_message_context",
    "inject_message_headers",
    "producer_span",
    "record_dead_letter",
    "use_trace_context",
]
