"""The engine runs every step under the saga's stored trace context and correlation id.

A real SagaEngine on a real SQLite EventStore file, with an in-process participant
(a StepInvoker that records what each call carried and what was current during it)
and telemetry recording into in-memory exporters. Checked, with tracing on and off:
the metadata each call sends (no second ``traceparent``), the step span and its
parent, the correlation id current during the call, the same after the engine is
stopped mid-saga and a new engine over the same storage resumes it, and the saga
outcome metric.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from rpcmesh.v1 import saga_pb2 as pb

from rpcmesh.controlplane.eventstore.sqlite import SqliteEventStorage
from rpcmesh.controlplane.saga.engine import SagaEngine
from rpcmesh.controlplane.saga.invoker import StepCallError
from rpcmesh.telemetry import DISABLED, Telemetry, TelemetryConfig, correlation_id

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"
STORED = {"traceparent": TRACEPARENT, "baggage": "tenant=acme"}


@dataclass
class Seen:
    """One call as the participant saw it."""

    step: str
    metadata: list[tuple[str, str]]
    correlation: str | None
    trace_id: str
    span_id: str


@dataclass
class Participant:
    """An in-process StepInvoker: answers each call; ``fail_first`` calls per step get UNAVAILABLE."""

    injects_trace_context: bool = False
    fail_first: dict[str, int] = field(default_factory=dict)
    hold: set[str] = field(default_factory=set)
    calls: list[Seen] = field(default_factory=list)
    held: asyncio.Event = field(default_factory=asyncio.Event)

    async def invoke(
        self,
        service: str,
        method: str,
        request: bytes,
        *,
        deadline: float,
        metadata: Sequence[tuple[str, str]],
    ) -> bytes:
        current = trace.get_current_span().get_span_context()
        step = dict(metadata)["x-saga-step"]
        self.calls.append(
            Seen(
                step,
                list(metadata),
                correlation_id(),
                format(current.trace_id, "032x"),
                format(current.span_id, "016x"),
            )
        )
        if step in self.hold:
            self.held.set()
            await asyncio.Event().wait()  # until cancelled (the engine stops)
        if self.fail_first.get(step, 0) > 0:
            self.fail_first[step] -= 1
            raise StepCallError(14, "try again")
        return request

    async def close(self) -> None:
        pass


@dataclass
class Recorded:
    telemetry: Telemetry
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader


@pytest.fixture
def recorded() -> Recorded:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    telemetry = Telemetry(TelemetryConfig(), tracer=provider.get_tracer("test"), meter=meter)
    return Recorded(telemetry, spans, reader)


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SqliteEventStorage]:
    store = SqliteEventStorage(tmp_path / "events.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def definition() -> pb.SagaDefinition:
    def step(name: str) -> pb.SagaStep:
        result = pb.SagaStep(
            name=name,
            service=f"svc-{name}",
            method="/test.v1.Ledger/Do",
            no_compensation=True,
            request=pb.PayloadTemplate(base_from="input"),
        )
        result.retry.initial_backoff.FromMilliseconds(10)
        return result

    return pb.SagaDefinition(name="traced", steps=[step("reserve"), step("ship")])


async def run_saga(engine: SagaEngine, correlation: str = "corr-1") -> str:
    view, _ = await engine.start_saga(
        definition(), b"\x0a\x01x", trace_context=STORED, correlation_id=correlation
    )
    return view.saga_id


def keys(seen: Seen, key: str) -> list[str]:
    return [value for k, value in seen.metadata if k == key]


async def test_tracing_on_step_spans_parent_the_calls_under_the_stored_context(
    storage: SqliteEventStorage, recorded: Recorded
) -> None:
    participant = Participant(fail_first={"ship": 1})
    engine = SagaEngine(storage, participant, telemetry=recorded.telemetry)
    view = await engine.wait_finished(await run_saga(engine), 10)
    await engine.stop()
    assert view.state == pb.SAGA_STATE_COMPLETED

    spans = {(s.name, s.attributes["rpcmesh.saga.attempt"]): s for s in recorded.spans.get_finished_spans()}
    assert sorted(spans) == [("saga.step reserve", 1), ("saga.step ship", 1), ("saga.step ship", 2)]
    for span in spans.values():
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_SPAN
        assert span.kind == trace.SpanKind.INTERNAL
        assert span.attributes["rpcmesh.saga.id"] == view.saga_id
        assert span.attributes["rpcmesh.saga.phase"] == "execute"
        assert span.attributes["rpcmesh.correlation_id"] == "corr-1"
    assert spans[("saga.step ship", 1)].attributes["rpcmesh.saga.outcome"] == "failed"
    assert spans[("saga.step ship", 1)].status.status_code == trace.StatusCode.ERROR
    assert spans[("saga.step ship", 2)].attributes["rpcmesh.saga.outcome"] == "succeeded"

    # The engine wrote the headers of the current (step) span once each; a mesh would replace them.
    by_span = {format(s.context.span_id, "016x"): s for s in spans.values()}
    for seen in participant.calls:
        assert seen.correlation == "corr-1" and seen.trace_id == TRACE_ID
        assert seen.span_id in by_span  # the step span is current during the call
        (traceparent,) = keys(seen, "traceparent")
        assert traceparent == f"00-{TRACE_ID}-{seen.span_id}-01"
        assert keys(seen, "x-correlation-id") == ["corr-1"]
        (baggage,) = keys(seen, "baggage")
        assert "tenant=acme" in baggage and "rpcmesh.correlation_id=corr-1" in baggage

    outcomes = [
        point.attributes
        for metric in recorded.metrics.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
        if metric.name == "rpcmesh.saga.outcomes"
        for point in metric.data.data_points
    ]
    assert outcomes == [{"rpcmesh.saga.definition": "traced", "rpcmesh.saga.outcome": "completed"}]


async def test_a_tracing_invoker_gets_no_trace_headers_to_send_twice(
    storage: SqliteEventStorage, recorded: Recorded
) -> None:
    participant = Participant(injects_trace_context=True)
    engine = SagaEngine(storage, participant, telemetry=recorded.telemetry)
    await engine.wait_finished(await run_saga(engine), 10)
    await engine.stop()
    for seen in participant.calls:
        assert not [k for k, _ in seen.metadata if k in ("traceparent", "tracestate", "baggage")]
        assert not keys(seen, "x-correlation-id")  # the mesh's interceptors write it from the current id
        assert seen.correlation == "corr-1" and seen.trace_id == TRACE_ID


async def test_tracing_off_sends_the_stored_headers_once(storage: SqliteEventStorage) -> None:
    participant = Participant(injects_trace_context=True)
    engine = SagaEngine(storage, participant, telemetry=DISABLED)
    await engine.wait_finished(await run_saga(engine), 10)
    await engine.stop()
    assert len(participant.calls) == 2
    for seen in participant.calls:
        assert keys(seen, "traceparent") == [TRACEPARENT]
        assert keys(seen, "baggage") == ["tenant=acme"]
        assert keys(seen, "x-correlation-id") == ["corr-1"]
        assert seen.correlation == "corr-1"  # current during the call (log records carry it)
        assert seen.trace_id == "0" * 32  # no span anywhere


async def test_a_resumed_saga_continues_the_stored_trace(
    storage: SqliteEventStorage, recorded: Recorded
) -> None:
    first = Participant(hold={"ship"})
    engine = SagaEngine(storage, first, telemetry=recorded.telemetry)
    saga_id = await run_saga(engine, correlation="corr-restart")
    await asyncio.wait_for(first.held.wait(), 10)
    await engine.stop()  # the ship call never returns: its outcome is not recorded

    second = Participant()
    resumed = SagaEngine(storage, second, telemetry=recorded.telemetry)
    await resumed.start()
    assert resumed.resume_all() == 1
    view = await resumed.wait_finished(saga_id, 10)
    await resumed.stop()
    assert view.state == pb.SAGA_STATE_COMPLETED

    (again,) = second.calls
    assert again.step == "ship" and again.trace_id == TRACE_ID and again.correlation == "corr-restart"
    ship = [s for s in recorded.spans.get_finished_spans() if s.name == "saga.step ship"]
    assert [s.attributes["rpcmesh.saga.outcome"] for s in ship] == ["cancelled", "succeeded"]
    for span in ship:
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_SPAN


async def test_saga_without_a_correlation_id_uses_its_id_for_every_step(
    storage: SqliteEventStorage,
) -> None:
    participant = Participant()
    engine = SagaEngine(storage, participant, telemetry=DISABLED)
    saga_id = await run_saga(engine, correlation="")
    await engine.wait_finished(saga_id, 10)
    await engine.stop()
    assert {seen.correlation for seen in participant.calls} == {saga_id}
