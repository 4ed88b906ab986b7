"""The caller's trace context, carried from call metadata into published messages.

A Python publisher writes ``traceparent``/``tracestate``/``baggage`` and
``x-correlation-id`` into each message's headers itself. Other callers (a
non-Python client, the gateway) only send them as call metadata; the Bus copies
them into the messages that lack them, so subscribers and dead letters see the
caller's trace as StartSaga does.

Rules: the trace keys travel together: a message with its own ``traceparent``
keeps its trace keys untouched; one without gets those of the call. The
correlation id is copied into every message without one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rpcmesh.telemetry.correlation import CORRELATION_METADATA_KEY as CORRELATION_KEY
from rpcmesh.telemetry.propagation import PROPAGATED_KEYS
from rpcmesh.v1 import bus_pb2

TRACE_KEYS = PROPAGATED_KEYS - {CORRELATION_KEY}
"""W3C trace context and baggage: copied as one set."""


def call_trace_headers(metadata: Iterable[Any] | None) -> dict[str, str]:
    """The trace and correlation keys of a call's metadata (text values only)."""
    found: dict[str, str] = {}
    for item in metadata or ():
        key, value = item[0], item[1]
        if key in PROPAGATED_KEYS and isinstance(value, str) and value and key not in found:
            found[key] = value
    return found


def stamp(messages: Iterable[bus_pb2.BusMessage], call_headers: dict[str, str]) -> None:
    """Copy the call's trace context into messages that lack it (in place)."""
    if not call_headers:
        return
    trace = {key: value for key, value in call_headers.items() if key in TRACE_KEYS}
    correlation = call_headers.get(CORRELATION_KEY)
    for message in messages:
        if "traceparent" in trace and "traceparent" not in message.headers:
            for key, value in trace.items():
                message.headers[key] = value
        if correlation and CORRELATION_KEY not in message.headers:
            message.headers[CORRELATION_KEY] = correlation
