"""The saga engine: runs every saga's state machine, writing each transition to the EventStore first.

Each saga has a runner task. Under the saga's lock the runner asks the pure
state machine (:func:`decide`) what to do, records the transition in the
saga's stream (``saga-<id>``) with the expected revision, then acts. Outcomes
of calls are appended together with the next transition (one write per step),
so a crash can lose only an outcome, and the call is then made again with the
same idempotency key. A write conflict (another writer touched the stream)
reloads the saga from its stream.

Runners start in an empty context; each step call and compensation runs under the
saga's stored trace context and correlation id (:mod:`~rpcmesh.controlplane.saga.tracing`),
so its spans join the trace the saga was started in, also after a restart. Finished
sagas are counted in the ``rpcmesh.saga.outcomes``/``rpcmesh.saga.duration`` metrics.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from rpcmesh.controlplane.eventstore.model import (
    NO_STREAM,
    StoredEvent,
    WrongExpectedVersion,
)
from rpcmesh.controlplane.eventstore.storage import EventStorage
from rpcmesh.controlplane.saga import machine
from rpcmesh.controlplane.saga.definition import step_timeout, validate_definition, validate_input
from rpcmesh.controlplane.saga.definitions import DefinitionBook
from rpcmesh.controlplane.saga.invoker import (
    CORRELATION_ID_KEY,
    IDEMPOTENCY_KEY,
    SAGA_ID_KEY,
    SAGA_PHASE_KEY,
    SAGA_STEP_KEY,
    STARTED_BY_KEY,
    StepCallError,
    StepInvoker,
)
from rpcmesh.controlplane.saga.machine import SagaEvent, SagaView
from rpcmesh.controlplane.saga.records import (
    DEFINITION_STREAM_PREFIX,
    SAGA_STREAM_PREFIX,
    UNREADABLE,
    from_stored,
    saga_id_for_key,
    saga_stream,
    to_stored,
)
from rpcmesh.controlplane.saga.tracing import saga_correlation_id, saga_outcome, step_scope
from rpcmesh.controlplane.saga.wire import WireError
from rpcmesh.errors import (
    FailedPreconditionError,
    NotFoundError,
    status_code_name,
)
from rpcmesh.tasks import stop_tasks
from rpcmesh.telemetry import Telemetry, get_telemetry, inject_metadata
from rpcmesh.v1 import saga_pb2 as pb

logger = logging.getLogger(__name__)

# Finished sagas whose recorded transitions stay in memory for WatchSaga; older
# ones are read back from their stream when watched.
RECENT_FINISHED = 4096


@dataclass
class _Saga:
    view: SagaView
    revision: int
    # Durable transitions, index == stream revision; None once trimmed (finished sagas only).
    recorded: list[SagaEvent] | None = None
    # Set (and replaced) whenever transitions become durable: wakes the watchers.
    recorded_changed: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: list[SagaEvent] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def publish(self, events: Sequence[SagaEvent]) -> None:
        """Make newly durable transitions visible to watchers."""
        if self.recorded is not None:
            self.recorded.extend(events)
        changed, self.recorded_changed = self.recorded_changed, asyncio.Event()
        changed.set()


class _Deposed(Exception):
    """This node's lease on driving sagas ran out: its runners stop without acting."""


class SagaEngine:
    """Owns definitions and sagas of one coordinator process.

    On SQLite (one node) the engine drives every saga. When several coordinators
    share a PostgreSQL store (``shared``), only the node holding the store's saga
    lease drives (``driving``; ``lease`` is checked before every call and runner
    write); the others mirror the sagas from the store's log
    (:mod:`~rpcmesh.controlplane.saga.ownership`) and still accept every RPC.
    """

    def __init__(
        self,
        storage: EventStorage,
        invoker: StepInvoker,
        *,
        clock: Callable[[], float] = time.time,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.storage = storage
        self.invoker = invoker
        self.clock = clock
        self.telemetry = telemetry
        # A MeshStepInvoker's mesh writes trace headers per attempt itself when tracing is on.
        self._invoker_injects = bool(getattr(invoker, "injects_trace_context", False))
        self._sagas: dict[str, _Saga] = {}
        self.definitions = DefinitionBook(storage)
        self._stopping = False
        self._recent_finished: collections.deque[str] = collections.deque()
        # Several nodes on one store: see the "shared store" section at the end of the class.
        self.driving = True
        self.lease: Callable[[], bool] | None = None
        self._failed: set[str] = set()  # sagas whose runner ended on an error

    @property
    def shared(self) -> bool:
        """Several coordinators share this engine's (PostgreSQL) store."""
        return self.definitions.shared

    @shared.setter
    def shared(self, value: bool) -> None:
        self.definitions.shared = value

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load definitions and sagas from the EventStore (:meth:`resume_all` runs the unfinished)."""
        for stream, events in (await self._load_streams(DEFINITION_STREAM_PREFIX)).items():
            try:
                self.definitions.load(stream.removeprefix(DEFINITION_STREAM_PREFIX), events)
            except UNREADABLE:
                logger.exception("saga coordinator skips stream %s: not a saga definition", stream)
        for stream, events in (await self._load_streams(SAGA_STREAM_PREFIX)).items():
            try:
                self._adopt(events)
            except UNREADABLE:
                logger.exception("saga coordinator skips stream %s: not saga transitions", stream)

    def _adopt(self, stored: Sequence[StoredEvent]) -> _Saga:
        """Track a saga recorded in storage (unfinished ones keep their transitions in memory)."""
        recorded = [from_stored(e) for e in stored]
        view = machine.fold(recorded)
        saga = _Saga(view=view, revision=stored[-1].revision, recorded=None if view.finished else recorded)
        self._sagas[view.saga_id] = saga
        if view.finished:
            saga.done.set()
        return saga

    def resume_all(self) -> int:
        """Start a runner for every unfinished saga that has none; returns how many."""
        resumed = 0
        for saga in self._sagas.values():
            if not saga.view.finished and saga.task is None:
                self._spawn(saga)
                resumed += 1
        logger.info("saga engine resumed %d unfinished sagas", resumed)
        return resumed

    async def _load_streams(self, prefix: str) -> dict[str, list[StoredEvent]]:
        streams: dict[str, list[StoredEvent]] = {}
        position = 1
        while True:
            events, _ = await self.storage.read_all(position, limit=1000, stream_prefixes=[prefix])
            for event in events:
                streams.setdefault(event.stream, []).append(event)
            if len(events) < 1000:
                return streams
            position = events[-1].position + 1

    async def stop(self) -> None:
        """Cancel the runners; unrecorded outcomes are re-invoked (same key) after a restart."""
        self._stopping = True
        await self._cancel_runners()
        await self.invoker.close()

    async def _cancel_runners(self) -> None:
        """Cancel every saga's runner and wait until each has ended."""
        await stop_tasks([s.task for s in self._sagas.values() if s.task is not None])

    # -- sagas ----------------------------------------------------------------------------------

    async def start_saga(
        self,
        definition: pb.SagaDefinition,
        input_data: bytes,
        *,
        idempotency_key: str = "",
        labels: Mapping[str, str] | None = None,
        trace_context: Mapping[str, str] | None = None,
        correlation_id: str = "",
        started_by: str = "",
    ) -> tuple[SagaView, bool]:
        """Record SagaStarted plus the first step's start in one write, then run; (view, created)."""
        encoded = self.definitions.encoded(definition)
        if encoded is None:  # given inline (registered versions were validated when stored)
            validate_definition(definition)
        validate_input(input_data)
        saga_id = saga_id_for_key(idempotency_key) if idempotency_key else uuid.uuid4().hex
        existing = self._sagas.get(saga_id)
        if existing is not None:
            return existing.view, False
        now = self.clock()
        first = machine.started_event(
            saga_id=saga_id,
            definition=definition,
            input_data=input_data,
            idempotency_key=idempotency_key,
            trace_context=trace_context or {},
            correlation_id=correlation_id,
            labels=labels or {},
            now=now,
            encoded_definition=encoded,
            started_by=started_by,
        )
        view = machine.fold([first], definition)
        events = [first]
        decision = machine.decide(view, now)
        if isinstance(decision, machine.Invoke):
            # Record the first call's start in the same write: one fsync fewer per saga.
            started = SagaEvent(machine.STEP_STARTED, {"step": view.steps[0].name, "attempt": 1}, now)
            machine.apply(view, started)
            events.append(started)
        try:
            result = await self.storage.append(
                saga_stream(saga_id), NO_STREAM, [to_stored(e) for e in events]
            )
        except WrongExpectedVersion:
            # Another start with the same key won the race (or this node has not loaded it yet).
            saga = self._sagas.get(saga_id) or await self._load(saga_id)
            return saga.view, False
        if saga_id in self._sagas:  # shared store: the log follower adopted it meanwhile
            return self._sagas[saga_id].view, True
        saga = _Saga(view=view, revision=result.current_revision, recorded=list(events))
        self._sagas[saga_id] = saga
        self._spawn(saga, first_invoke=decision if isinstance(decision, machine.Invoke) else None)
        return view, True

    async def _load(self, saga_id: str) -> _Saga:
        events, _ = await self.storage.read_stream(saga_stream(saga_id), 0, backwards=False, limit=1_000_000)
        if saga_id in self._sagas:  # adopted by another task meanwhile
            return self._sagas[saga_id]
        saga = self._adopt(events)
        if not saga.view.finished:
            self._spawn(saga)
        return saga

    def get_saga(self, saga_id: str) -> SagaView:
        """One saga; NOT_FOUND if unknown."""
        saga = self._sagas.get(saga_id)
        if saga is None:
            raise NotFoundError(f"saga_id: no saga {saga_id!r}")
        return saga.view

    def list_sagas(self, after: tuple[float, str] | None = None) -> list[SagaView]:
        """Every saga, newest first: by ``started_at`` descending, then ``saga_id`` ascending.

        With ``after`` (the ``started_at`` and ``saga_id`` of a saga, present or not), only the sagas
        that come strictly after it in that order, so a listing resumed there neither skips nor
        repeats a saga when others start or change state in between.
        """
        views = [s.view for s in self._sagas.values()]
        if after is not None:
            key = (-after[0], after[1])
            views = [v for v in views if (-v.started_at, v.saga_id) > key]
        return sorted(views, key=lambda v: (-v.started_at, v.saga_id))

    async def abort_saga(self, saga_id: str, reason: str) -> SagaView:
        """Record AbortRequested; the runner compensates what completed."""

        def refusal(view: SagaView) -> str | None:
            if view.state == pb.SAGA_STATE_RUNNING:
                return None
            state = pb.SagaState.Name(pb.SagaState.ValueType(view.state))
            return f"saga {saga_id} is {state}; only a RUNNING saga can be aborted"

        def event(view: SagaView) -> SagaEvent:
            return SagaEvent(machine.ABORT_REQUESTED, {"reason": reason}, self.clock())

        return await self.record_request(saga_id, refusal, event)

    async def record_request(
        self,
        saga_id: str,
        refusal: Callable[[SagaView], str | None],
        make_event: Callable[[SagaView], SagaEvent],
    ) -> SagaView:
        """Append one requested transition (abort, an operator's action) to a saga, then wake its runner.

        Under the saga's lock, ``refusal(view)`` says why the request does not apply to the saga as it
        is now (FAILED_PRECONDITION with that text), else ``make_event(view)`` is written with the
        expected revision; when another node wrote first the saga is reloaded and checked again. A
        saga that the request reopens gets a runner again on the driving node.

        Raises:
            NotFoundError: no such saga.
            FailedPreconditionError: ``refusal`` said why not.
        """
        if self.shared:
            await self.fetch_saga(saga_id)
        saga = self._sagas.get(saga_id)
        if saga is None:
            raise NotFoundError(f"saga_id: no saga {saga_id!r}")
        while True:
            async with saga.lock:
                problem = refusal(saga.view)
                if problem is not None:
                    raise FailedPreconditionError(problem)
                if saga.recorded is None:
                    await self._reload(saga)  # trimmed from memory: the next transition needs them
                    continue
                try:
                    await self._flush(saga, [make_event(saga.view)])
                except WrongExpectedVersion:
                    continue  # another node wrote first: reloaded, check again
                if not saga.view.finished:
                    saga.done.clear()  # GetSaga/StartSaga long polls wait for the new end
                    if self.driving and (saga.task is None or saga.task.done()):
                        self._spawn(saga)
            saga.wake.set()
            return saga.view

    async def wait_finished(self, saga_id: str, wait_seconds: float | None = None) -> SagaView:
        """The saga once it has ended, or as it is after ``wait_seconds`` (None: no limit).

        Raises:
            NotFoundError: no such saga.
        """
        saga = self._sagas.get(saga_id)
        if saga is None:
            raise NotFoundError(f"saga_id: no saga {saga_id!r}")
        if not saga.view.finished and (wait_seconds is None or wait_seconds > 0):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(saga.done.wait(), wait_seconds)
        return self._sagas[saga_id].view

    async def watch(self, saga_id: str) -> AsyncIterator[tuple[SagaEvent, SagaView]]:
        """Every recorded transition of a saga with the saga after it, from the start until it ends.

        Served from the transitions this engine made durable (no storage read
        per append); a finished saga whose transitions were trimmed from
        memory is read back from its stream once.
        """
        self.get_saga(saga_id)
        after = 0  # next revision to report
        view: SagaView | None = None
        while True:
            saga = self._sagas[saga_id]
            changed = saga.recorded_changed
            recorded = saga.recorded
            if recorded is not None:
                batch = recorded[after:]
            else:
                stored, _ = await self.storage.read_stream(
                    saga_stream(saga_id), after, backwards=False, limit=1_000_000
                )
                batch = [from_stored(e) for e in stored]
            for event in batch:
                after += 1
                if view is None:
                    view = machine.fold([event])
                else:
                    machine.apply(view, event)
                yield event, view
            if view is not None and view.finished:
                return
            if recorded is None and batch:
                continue
            await changed.wait()

    # -- running --------------------------------------------------------------------------------

    def _spawn(self, saga: _Saga, first_invoke: machine.Invoke | None = None) -> None:
        if self._stopping or not self.driving:
            return
        # A fresh context: steps run under the saga's stored trace context and correlation id
        # only, never under whatever the caller that started or loaded the saga had current.
        saga.task = asyncio.create_task(
            self._run(saga, first_invoke), name=f"saga-{saga.view.saga_id}", context=contextvars.Context()
        )

    async def _flush(self, saga: _Saga, extra: Sequence[SagaEvent]) -> None:
        """Append pending outcomes plus ``extra`` at the known revision (caller holds the lock)."""
        events = [*saga.pending, *extra]
        if not events:
            return
        try:
            result = await self.storage.append(
                saga_stream(saga.view.saga_id), saga.revision, [to_stored(e) for e in events]
            )
        except WrongExpectedVersion:
            await self._reload(saga)
            raise
        saga.pending.clear()
        saga.revision = result.current_revision
        for event in extra:
            machine.apply(saga.view, event)
        saga.view.updated_at = events[-1].time
        saga.publish(events)
        if saga.view.finished:
            saga.done.set()  # wakes GetSaga long polls now, not when the runner exits
            self._remember_finished(saga.view.saga_id)
            self._record_finished(saga.view)

    def _record_finished(self, view: SagaView) -> None:
        """Saga outcome and duration metrics (once per saga: only this process's flush finishes it)."""
        metrics = (self.telemetry or get_telemetry()).metrics
        if metrics.enabled:
            state = pb.SagaState.Name(pb.SagaState.ValueType(view.state))
            metrics.saga_finished(
                view.definition.name, saga_outcome(state), max(0.0, view.ended_at - view.started_at)
            )

    def _remember_finished(self, saga_id: str) -> None:
        """Keep the transitions of recently finished sagas; trim the oldest beyond the cap."""
        self._recent_finished.append(saga_id)
        while len(self._recent_finished) > RECENT_FINISHED:
            old = self._sagas.get(self._recent_finished.popleft())
            if old is not None:
                old.recorded = None

    async def _reload(self, saga: _Saga) -> None:
        events, _ = await self.storage.read_stream(
            saga_stream(saga.view.saga_id), 0, backwards=False, limit=1_000_000
        )
        recorded = [from_stored(e) for e in events]
        saga.view = machine.fold(recorded)
        saga.revision = events[-1].revision
        saga.pending.clear()
        saga.recorded = recorded
        saga.publish(())

    async def _run(self, saga: _Saga, first_invoke: machine.Invoke | None) -> None:
        try:
            invoke = first_invoke
            while True:
                if invoke is None:
                    invoke = await self._next_invoke(saga)
                    if invoke is None:
                        return
                await self._call(saga, invoke)
                invoke = None
        except asyncio.CancelledError:
            raise
        except _Deposed:
            # The lease ran out, but the lock session may outlive it (a heartbeat slowed by a short
            # partition): restarted after this node's next answered heartbeat if it still leads
            # (restart_failed); after a step-down the next leader resumes it.
            self._failed.add(saga.view.saga_id)
        except Exception:
            logger.exception("saga %s runner failed; it resumes on the next start", saga.view.saga_id)
            self._failed.add(saga.view.saga_id)
        finally:
            if saga.view.finished:
                saga.done.set()

    async def _next_invoke(self, saga: _Saga) -> machine.Invoke | None:
        """Decide under the lock until a call is due; record its start. None when finished."""
        while True:
            if self.lease is not None and not self.lease():
                raise _Deposed
            async with saga.lock:
                decision = machine.decide(saga.view, self.clock())
                try:
                    if isinstance(decision, machine.Finished):
                        await self._flush(saga, [])
                        return None
                    if isinstance(decision, machine.Record):
                        now = self.clock()
                        for kind, data in decision.events:
                            event = SagaEvent(kind, data, now)
                            machine.apply(saga.view, event)
                            saga.pending.append(event)
                        if saga.view.finished:
                            await self._flush(saga, [])
                            return None
                        continue
                except WrongExpectedVersion:
                    continue  # another node wrote (e.g. AbortRequested): reloaded, decide again
                if decision.delay <= 0:
                    step = saga.view.steps[decision.step].name
                    started = SagaEvent(
                        machine.started_kind(decision.compensation),
                        {"step": step, "attempt": decision.attempt},
                        self.clock(),
                    )
                    try:
                        await self._flush(saga, [started])
                    except WrongExpectedVersion:
                        continue
                    return decision
                saga.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(saga.wake.wait(), decision.delay)

    async def _call(self, saga: _Saga, invoke: machine.Invoke) -> None:
        if self.lease is not None and not self.lease():
            raise _Deposed
        view = saga.view
        step_def = view.definition.steps[invoke.step]
        step_name = step_def.name
        method = step_def.compensation_method if invoke.compensation else step_def.method
        metadata = [
            (SAGA_ID_KEY, view.saga_id),
            (SAGA_STEP_KEY, step_name),
            (SAGA_PHASE_KEY, "compensate" if invoke.compensation else "execute"),
            (IDEMPOTENCY_KEY, machine.idempotency_key(view.saga_id, step_name, invoke.compensation)),
        ]
        if view.started_by:
            metadata.append((STARTED_BY_KEY, view.started_by))
        telemetry = self.telemetry or get_telemetry()
        result: bytes | None = None
        code, error, sent = 0, "", True
        with step_scope(
            view,
            step=step_name,
            service=step_def.service,
            compensation=invoke.compensation,
            attempt=invoke.attempt,
            telemetry=telemetry,
        ) as span:
            if not telemetry.tracing:
                # Sent as stored: participants without OpenTelemetry and later hops still get them.
                metadata.append((CORRELATION_ID_KEY, saga_correlation_id(view)))
                metadata.extend(sorted(view.trace_context.items()))
            elif not self._invoker_injects:
                # The step span is current: its context travels (a mesh's interceptors do this themselves).
                metadata = inject_metadata(metadata)
            try:
                request = machine.request_for(view, invoke.step, invoke.compensation)
                result = await self.invoker.invoke(
                    step_def.service, method, request, deadline=step_timeout(step_def), metadata=metadata
                )
            except StepCallError as exc:
                code, error, sent = exc.code, f"{status_code_name(exc.code)}: {exc.message}", exc.sent
            except WireError as exc:
                code, error = 3, f"INVALID_ARGUMENT: building the request: {exc}"
            span.finish(code=code, error=error, sent=sent)
        kind, data = machine.outcome(
            step_name, invoke.compensation, result=result, code=code, error=error, sent=sent
        )
        async with saga.lock:
            if saga.view is not view:
                return  # reloaded after a conflict: the call is made again with the same key
            step = view.steps[invoke.step]
            in_flight = step.compensation_in_flight if invoke.compensation else step.in_flight
            if not in_flight:
                return
            event = SagaEvent(kind, data, self.clock())
            machine.apply(view, event)
            saga.pending.append(event)

    # -- shared store: several coordinators (driven by ownership.SagaOwnership) -----------------

    async def fetch_saga(self, saga_id: str) -> SagaView:
        """:meth:`get_saga`, reading the saga's newest transitions from a shared store first.

        Only a node that drives a saga it knows answers from memory; any other
        node reads the stream from the revision it has, so a saga started or
        advanced through another node is seen at once.
        """
        saga = self._sagas.get(saga_id)
        if self.shared and (saga is None or not self.driving):
            after = saga.revision + 1 if saga is not None else 0
            events, _ = await self.storage.read_stream(
                saga_stream(saga_id), after, backwards=False, limit=1_000_000
            )
            if events:
                await self.observe_saga(saga_id, events)
        return self.get_saga(saga_id)

    async def observe_saga(self, saga_id: str, events: Sequence[StoredEvent]) -> None:
        """Take in transitions another node recorded in a saga's stream (ascending revisions)."""
        saga = self._sagas.get(saga_id)
        if saga is None:
            saga = self._adopt(events) if events[0].revision == 0 else await self._load(saga_id)
            if self.driving and not saga.view.finished and saga.task is None:
                self._spawn(saga)
            return
        if events[-1].revision <= saga.revision:
            return
        async with saga.lock:
            fresh = [e for e in events if e.revision > saga.revision]
            if not fresh:
                return
            running = saga.task is not None and not saga.task.done()
            if fresh[0].revision == saga.revision + 1 and saga.recorded is not None:
                # Next in the stream: take it in as if written here (a runner in a call records
                # the outcome after it, as after a local AbortSaga).
                transitions = [from_stored(e) for e in fresh]
                if saga.pending:
                    # Outcomes not recorded yet (no call in flight then) will be written after these.
                    saga.view = machine.fold([*saga.recorded, *transitions, *saga.pending])
                else:
                    for transition in transitions:
                        machine.apply(saga.view, transition)
                saga.revision = fresh[-1].revision
                saga.publish(transitions)
            elif not running:
                await self._reload(saga)
            if saga.view.finished:
                saga.done.set()
                self._remember_finished(saga_id)
            else:
                saga.done.clear()  # an operator's RetryCompensation took a finished saga back
        # A waiting runner decides again now (if its view is behind, its next write conflicts and reloads).
        saga.wake.set()
        if self.driving and self._without_runner(saga):
            self._spawn(saga)

    @staticmethod
    def _without_runner(saga: _Saga) -> bool:
        """An unfinished saga whose runner never started or has ended."""
        return not saga.view.finished and (saga.task is None or saga.task.done())

    def restart_failed(self) -> int:
        """Run again every unfinished saga whose runner ended on an error (e.g. a lost connection).

        Their views are as the runner left them: anything it did not record is written
        with the next transition, or a conflict reloads the saga. Returns how many.
        """
        failed, self._failed = self._failed, set()
        restarted = 0
        for saga_id in failed:
            saga = self._sagas.get(saga_id)
            if saga is not None and self._without_runner(saga):
                self._spawn(saga)
                restarted += 1
        return restarted

    def take_over(self) -> int:
        """This node now holds the lease: drive every unfinished saga; returns how many."""
        self.driving = True
        return self.resume_all()

    async def step_down(self) -> None:
        """The lease is lost: stop the runners, forget unrecorded outcomes, keep mirroring."""
        self.driving = False
        await self._cancel_runners()
        for saga in self._sagas.values():
            saga.task = None
            if not saga.view.finished and saga.recorded:
                saga.pending.clear()
                saga.view = machine.fold(saga.recorded)
                saga.publish(())
