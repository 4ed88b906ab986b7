"""Cheap call spans: rpcmesh's own span objects and the batch pipeline that hands them to exporters.

The OpenTelemetry SDK's ``Tracer.start_span`` + ``Span.end`` cost far more than a local gRPC
call is allowed to (attribute cleaning through ``BoundedAttributes``, a sampler call that
builds a ``SamplingResult``, two processor hooks, a ``ReadableSpan`` copy at end). Every RPC
makes one span per side, so the call interceptors use ``CallTracer`` instead:

- ``CallSpan`` implements the OpenTelemetry ``Span`` API (``set_attribute``, ``add_event``,
  ``record_exception``, ``set_status``, ``end``), so it can be current in a ``Context`` and
  other code (retry layers, handlers, the SDK's own spans) parents children on it. Its
  per-method attributes are one shared, pre-built dict; only per-call ones are copied.
- ``CallTracer`` decides sampling itself for the standard samplers (the same decisions as
  the SDK's ``ParentBased``/``TraceIdRatioBased``), draws ids with one ``getrandbits``,
  and does nothing but build a ``NonRecordingSpan`` for an unsampled call.
- ``SpanPipeline`` is a batch span processor for both kinds: SDK spans arrive through
  ``on_end``, ``CallSpan``s through ``submit``; both go into one bounded deque that a
  background thread drains in batches to the exporters, turning ``CallSpan``s into SDK
  ``ReadableSpan``s only there, off the call path, and only for exporters that need
  them (rpcmesh's OTLP exporter encodes ``CallSpan``s directly: ``accepts_call_spans``).
  With ``simple=True`` each span is exported as it ends (tests).
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.util import types

from rpcmesh.telemetry.traceparent import EMPTY_TRACE_STATE, trusted_span_context

logger = logging.getLogger(__name__)

_SAMPLED = TraceFlags.SAMPLED
_RANDOM = TraceFlags.RANDOM_TRACE_ID
_LOW_64 = (1 << 64) - 1
_ids = random.Random()  # seeded from os.urandom; re-seeded in forked children so they never share ids
os.register_at_fork(after_in_child=_ids.seed)


class CallSpan(trace.Span):
    """A recording span built by ``CallTracer``; exported through ``SpanPipeline`` when it ends."""

    __slots__ = (
        "_attributes",
        "_base",
        "_context",
        "_end",
        "_events",
        "_kind",
        "_name",
        "_parent",
        "_start",
        "_status",
        "_tracer",
    )

    def __init__(
        self,
        tracer: CallTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        base: Mapping[str, types.AttributeValue],
        attributes: dict[str, types.AttributeValue],
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._base = base
        self._attributes = attributes
        self._events: list[Event] | None = None
        self._status: Status | None = None
        self._start = time.time_ns()
        self._end: int | None = None

    def get_span_context(self) -> SpanContext:
        """The span's context (trace id, span id, sampled)."""
        return self._context

    def is_recording(self) -> bool:
        """True until the span ends."""
        return self._end is None

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        """Set one attribute (None values are dropped, as the SDK does)."""
        if self._end is None and value is not None:
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        """Set several attributes."""
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        """Add a span event."""
        if self._end is not None:
            return
        if self._events is None:
            self._events = []
        self._events.append(
            Event(name, dict(attributes) if attributes else None, timestamp or time.time_ns())
        )

    def update_name(self, name: str) -> None:
        """Rename the span."""
        if self._end is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """Set the status (``OK`` is final, as in the SDK)."""
        if self._end is not None or (self._status is not None and self._status.status_code is StatusCode.OK):
            return
        self._status = status if isinstance(status, Status) else Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """Add the ``exception`` event (type, message, stack trace) as the SDK does."""
        event_attributes: dict[str, types.AttributeValue] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event_attributes.update(attributes)
        self.add_event("exception", event_attributes, timestamp)

    def end(self, end_time: int | None = None) -> None:
        """End the span and queue it for export; later calls do nothing."""
        if self._end is not None:
            return
        self._end = end_time or time.time_ns()
        self._tracer.pipeline.submit(self)

    def to_readable(self) -> ReadableSpan:
        """The SDK form exporters take (built in the export thread)."""
        attributes = {**self._base, **self._attributes} if self._attributes else dict(self._base)
        tracer = self._tracer
        return ReadableSpan(
            name=self._name,
            context=self._context,
            parent=self._parent,
            resource=tracer.resource,
            attributes=MappingProxyType(attributes),
            events=tuple(self._events) if self._events else (),
            kind=self._kind,
            status=self._status or Status(StatusCode.UNSET),
            start_time=self._start,
            end_time=self._end,
            instrumentation_scope=tracer.instrumentation_scope,
        )


class CallTracer:
    """Starts ``CallSpan``s with the sampling decision of one of the standard samplers.

    Args:
        pipeline: Where ended spans go.
        sampler: A ``TelemetryConfig.sampler`` name.
        ratio: The ratio of the ``traceidratio`` samplers.
        resource: The SDK ``Resource`` of every span.
        instrumentation_scope: The scope of every span (rpcmesh's tracer's).
    """

    def __init__(
        self,
        pipeline: SpanPipeline,
        *,
        sampler: str,
        ratio: float,
        resource: Any,
        instrumentation_scope: Any,
    ) -> None:
        self.pipeline = pipeline
        self.resource = resource
        self.instrumentation_scope = instrumentation_scope
        self._parent_based = sampler.startswith("parentbased_")
        root = sampler.removeprefix("parentbased_")
        self._always = root == "always_on"
        self._never = root == "always_off"
        self._bound = TraceIdRatioBased.get_bound_for_rate(ratio)
        self._random = _ids

    def sampled(self, parent: SpanContext | None, trace_id: int) -> bool:
        """The sampling decision for a new span (parent None: a root span)."""
        if parent is not None and self._parent_based:
            return bool(parent.trace_flags & _SAMPLED)
        if self._always:
            return True
        if self._never:
            return False
        return (trace_id & _LOW_64) < self._bound

    def start(
        self,
        name: str,
        kind: SpanKind,
        parent: SpanContext | None,
        base: Mapping[str, types.AttributeValue],
        attributes: dict[str, types.AttributeValue],
    ) -> trace.Span:
        """A recording ``CallSpan``, or a ``NonRecordingSpan`` (ids only) when not sampled.

        Args:
            name: Span name.
            kind: Span kind.
            parent: The parent's context; None or invalid: a new trace.
            base: Attributes shared by every span of this method (never modified).
            attributes: This span's own attributes (owned by the span from now on).
        """
        if parent is None or not parent.is_valid:
            parent = None
            bits = self._random.getrandbits(192)
            trace_id, span_id = bits >> 64, bits & _LOW_64
            while trace_id == 0 or span_id == 0:  # invalid ids; as unlikely as it gets
                bits = self._random.getrandbits(192)
                trace_id, span_id = bits >> 64, bits & _LOW_64
            flags = _RANDOM
            state = EMPTY_TRACE_STATE
        else:
            trace_id = parent.trace_id
            span_id = self._random.getrandbits(64) or 1
            flags = parent.trace_flags & _RANDOM
            state = parent.trace_state
        sampled = self.sampled(parent, trace_id)
        if sampled:
            flags |= _SAMPLED
        context = trusted_span_context(trace_id, span_id, flags, state)  # both ids are known valid here
        if not sampled:
            return NonRecordingSpan(context)
        return CallSpan(self, name, context, parent, kind, base, attributes)


class SpanPipeline(SpanProcessor):
    """Batch span processor for SDK spans (``on_end``) and ``CallSpan``s (``submit``).

    Args:
        exporters: Where batches go (each gets every batch).
        simple: Export each span as it ends, on the caller's thread (tests, debugging).
        max_queue: Spans held at most; more are dropped (and counted in ``dropped``).
        max_batch: Spans per export call; reaching it wakes the exporter thread early.
        schedule_delay_s: Longest a span waits before the exporter thread looks.
    """

    def __init__(
        self,
        exporters: Sequence[SpanExporter],
        *,
        simple: bool = False,
        max_queue: int = 65536,
        max_batch: int = 4096,
        schedule_delay_s: float = 1.0,
    ) -> None:
        self._exporters = list(exporters)
        self._simple = simple
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._delay = schedule_delay_s
        self._queue: collections.deque[CallSpan | ReadableSpan] = collections.deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._stopped = False
        self.dropped = 0
        """Spans dropped because the queue was full."""
        self._worker: threading.Thread | None = None
        if not simple:
            self._worker = threading.Thread(target=self._run, name="rpcmesh-span-export", daemon=True)
            self._worker.start()

    def submit(self, span: CallSpan | ReadableSpan) -> None:
        """Queue an ended span (or export it now in simple mode)."""
        if self._simple:
            self._export([span])
            return
        queue = self._queue
        if len(queue) >= self._max_queue or self._stopped:
            self.dropped += 1
            return
        queue.append(span)
        if len(queue) >= self._max_batch and not self._wake.is_set():
            self._wake.set()

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        """SDK hook; nothing to do at start."""

    def on_end(self, span: ReadableSpan) -> None:
        """SDK hook: queue an SDK span that ended (sampled spans only)."""
        if span.context is not None and span.context.trace_flags.sampled:
            self.submit(span)

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        queue = self._queue
        while queue:
            batch: list[CallSpan | ReadableSpan] = []
            try:
                for _ in range(self._max_batch):
                    batch.append(queue.popleft())
            except IndexError:
                pass
            self._export(batch)

    def _export(self, batch: Sequence[CallSpan | ReadableSpan]) -> None:
        readable: Sequence[ReadableSpan] | None = None
        with self._export_lock:
            for exporter in self._exporters:
                try:
                    if getattr(exporter, "accepts_call_spans", False):  # encodes CallSpans itself
                        cast(Any, exporter).export(batch)
                        continue
                    if readable is None:
                        readable = [
                            span.to_readable() if isinstance(span, CallSpan) else span for span in batch
                        ]
                    exporter.export(readable)
                except Exception:  # an exporter's failure must never reach the application
                    logger.exception("span export failed (%s)", type(exporter).__name__)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything queued, on the calling thread."""
        self._drain()
        deadline = time.monotonic() + timeout_millis / 1000
        for exporter in self._exporters:
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            try:
                exporter.force_flush(remaining)
            except Exception:  # flushing is best effort
                logger.debug("exporter flush failed", exc_info=True)
        return not self._queue

    def shutdown(self) -> None:
        """Stop the exporter thread, export what is queued and shut the exporters down."""
        if self._stopped:
            return
        self._stopped = True
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
        self._drain()
        for exporter in self._exporters:
            try:
                exporter.shutdown()
            except Exception:  # shutting down is best effort
                logger.debug("exporter shutdown failed", exc_info=True)
