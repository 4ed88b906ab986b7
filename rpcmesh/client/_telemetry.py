"""Telemetry of one mesh call, shared by the asyncio and sync shells: a no-op unless telemetry is on.

A logical call (all its retries and hedges) gets one INTERNAL span named
``service/method``; each attempt is a CLIENT span of its own, made by the
traced sub-channel of the instance (``trace_aio_channel``), as a child of it (so the
server span of each attempt hangs under its attempt). Attempts, breaker
rejections and breaker transitions are events on the logical span, counted in
the metrics by :mod:`rpcmesh.telemetry`. One correlation id serves every attempt.

The shells make the call's context current only in short synchronous scopes
(:meth:`CallTelemetry.scope`): around creating an attempt (grpc.aio copies the
context into the interceptor task it starts then) and around recording; never
across an ``await`` or a ``yield``, so the caller's context is never disturbed.
"""

from __future__ import annotations

from contextvars import Token
from types import TracebackType
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from rpcmesh.client.picker import NoEndpointError
from rpcmesh.telemetry._calls import MethodInfo, method_info, start_call_span
from rpcmesh.telemetry.attempts import record_attempt, record_breaker_rejection, record_breaker_transition
from rpcmesh.telemetry.correlation import (
    CORRELATION_ATTRIBUTE,
    correlation_id,
    new_correlation_id,
    reset_correlation_id,
    set_correlation_id,
)
from rpcmesh.telemetry.setup import Telemetry, get_telemetry

__all__ = ["CallTelemetry", "breaker_listener"]


def breaker_listener(telemetry: Telemetry | None) -> Any:
    """A breaker ``on_transition`` listener recording into ``telemetry`` (None: the installed one)."""

    def listener(name: str, from_state: str, to_state: str) -> None:
        record_breaker_transition(name, from_state, to_state, telemetry=telemetry)

    return listener


class _Scope:
    """Makes the call's OpenTelemetry context and correlation id current until exit."""

    __slots__ = ("_call", "_context_token", "_correlation_token")

    def __init__(self, call: CallTelemetry) -> None:
        self._call = call
        self._context_token: object | None = None
        self._correlation_token: Token[str | None] | None = None

    def __enter__(self) -> None:
        call = self._call
        if call.context is not None:
            self._context_token = otel_context.attach(call.context)
        self._correlation_token = set_correlation_id(call.correlation)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._correlation_token is not None:
            reset_correlation_id(self._correlation_token)
        if self._context_token is not None:
            otel_context.detach(self._context_token)  # type: ignore[arg-type]


class CallTelemetry:
    """Span, correlation id and events of one logical mesh call."""

    __slots__ = ("_finished", "context", "correlation", "method", "service", "span", "telemetry")

    def __init__(self, telemetry: Telemetry, info: MethodInfo) -> None:
        self.telemetry = telemetry
        self.service = info.service
        self.method = info.method
        self.correlation = correlation_id() or new_correlation_id()
        self.span: Span | None = None
        self.context: otel_context.Context | None = None
        self._finished = False
        if telemetry.tracing:
            # rpc.system/service/method shared per method; the cheap CallTracer path when there is one.
            self.span = start_call_span(
                telemetry,
                info.name,
                kind=SpanKind.INTERNAL,
                shared_attributes=info.base,
                attributes={CORRELATION_ATTRIBUTE: self.correlation},
            )
            self.context = trace.set_span_in_context(self.span)

    @classmethod
    def begin(cls, telemetry: Telemetry | None, full_method: str) -> CallTelemetry | None:
        """The call's telemetry, or None when telemetry is off (the shells then skip every hook)."""
        handle = telemetry or get_telemetry()
        if not handle.active:
            return None
        return cls(handle, method_info(full_method))

    def scope(self) -> _Scope:
        """A ``with`` block in which the call's span and correlation id are current (synchronous only)."""
        return _Scope(self)

    def attempt(
        self,
        number: int,
        peer: str,
        *,
        hedge: bool = False,
        backoff_s: float | None = None,
        reason: str | None = None,
    ) -> None:
        """Record an attempt about to be sent (call inside :meth:`scope`)."""
        record_attempt(
            number,
            service=self.service,
            method=self.method,
            hedge=hedge,
            peer=peer,
            backoff_s=backoff_s,
            reason=reason,
            telemetry=self.telemetry,
        )

    def rejected(self, error: NoEndpointError) -> None:
        """Record the breakers that refused the call, if breakers refused it."""
        if not error.breakers:
            return
        with self.scope():
            for index, name in enumerate(error.breakers):
                peer = error.peers[index] if index < len(error.peers) else None
                record_breaker_rejection(name, peer=peer, telemetry=self.telemetry)

    def finish(self, code: grpc.StatusCode, description: str | None = None) -> None:
        """End the call's span with its final status; later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        span = self.span
        if span is None:
            return
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {description or ''}".rstrip(": ")))
        span.end()

    def finish_with_error(self, error: BaseException) -> None:
        """End the call from an exception (RpcError, cancellation, anything else)."""
        if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
            self.finish(error.code(), error.details() if hasattr(error, "details") else None)
        elif isinstance(error, GeneratorExit) or type(error).__name__ == "CancelledError":
            self.finish(grpc.StatusCode.CANCELLED)
        else:
            self.finish(grpc.StatusCode.UNKNOWN, str(error))
