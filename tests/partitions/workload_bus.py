"""The Bus and saga parts of the partition workload (see :mod:`tests.partitions.workload`).

Bus: publishers publish one message at a time with a unique id (an ambiguous failure retries the same
id on the next node: JetStream deduplicates it), two members of one consumer group record every
delivery and ack at once. Sagas: the workload hosts two participant services itself
(:class:`~rpcmesh.ServiceHost`, registered through every node's address), records every call it
receives with the calling node's address, and a starter starts a three-step saga every 0.7 s: every
third one with a last step that always fails so the first two are compensated, every fifth of the
others with a slow (1 s) middle step that it aborts 0.3 s after the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc, saga_pb2, saga_pb2_grpc

from rpcmesh import ServiceHost, ServiceHostConfig
from tests.partitions.history import UNKNOWN
from tests.partitions.workload_base import CALL_TIMEOUT, Context, Cursor, guarded, record_call

__all__ = ["Extras", "close", "final", "start", "tasks"]

GROUP = "pt-group"
MAX_IN_FLIGHT = 16
PARTICIPANT = "pt.v1.Participant"
SERVICES = ("pt-pay", "pt-ship")


@dataclass
class Extras:
    """What the Bus and saga tasks share with the final phase."""

    kinds: tuple[str, ...]
    topic: str = ""
    published: set[str] = field(default_factory=set)
    delivered: set[str] = field(default_factory=set)
    hosts: list[ServiceHost] = field(default_factory=list)
    sagas: dict[str, str] = field(default_factory=dict)
    """Idempotency key -> the saga's kind: "ok", "failing" (its last step always fails) or "abort"
    (a slow middle step, aborted while it runs)."""
    saga_ids: dict[str, str] = field(default_factory=dict)
    """Idempotency key -> saga id, for the sagas whose start was acknowledged."""
    aborts: set[asyncio.Task[None]] = field(default_factory=set)
    consumers_stop: asyncio.Event = field(default_factory=asyncio.Event)
    consumers: list[asyncio.Task[None]] = field(default_factory=list)


# Bus ------------------------------------------------------------------------------------------


async def _create_topic(ctx: Context, topic: str) -> None:
    cursor = Cursor(ctx.nodes, 0)
    for _ in range(30):
        stub = bus_pb2_grpc.BusStub(ctx.channel(cursor.node))
        try:
            await stub.CreateTopic(bus_pb2.CreateTopicRequest(name=topic), timeout=CALL_TIMEOUT * 2)
            return
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                return
            cursor.rotate()
            await asyncio.sleep(0.3)
    raise RuntimeError(f"could not create topic {topic}")


async def publisher(ctx: Context, extras: Extras, index: int) -> None:
    """Publish one message at a time; retry an ambiguous publish with the same id on the next node."""
    proc = f"pub-{index}"
    cursor = Cursor(ctx.nodes, index)
    sequence = 0
    while not ctx.stop.is_set():
        sequence += 1
        message_id = f"{proc}-{sequence}"
        for attempt in range(4):
            stub = bus_pb2_grpc.BusStub(ctx.channel(cursor.node))
            request = bus_pb2.PublishRequest(
                topic=extras.topic, messages=[bus_pb2.BusMessage(id=message_id, payload=b"x")]
            )
            op, response = await record_call(
                ctx,
                proc,
                "publish",
                cursor.node,
                lambda s=stub, r=request: s.Publish(r, timeout=CALL_TIMEOUT),  # type: ignore[misc]
                {"topic": extras.topic, "id": message_id, "attempt": attempt},
                lambda r: {
                    "sequence": r.results[0].sequence,
                    "duplicate": r.results[0].duplicate,
                    "code": r.results[0].code,
                },
            )
            if response is not None and response.results[0].code == 0:
                extras.published.add(message_id)
                break
            if op.outcome != UNKNOWN and response is None:
                break
            cursor.rotate()
            if not await ctx.sleep(0.1) and attempt >= 1:
                break
        await ctx.sleep(0.1)


async def consumer(ctx: Context, extras: Extras, index: int) -> None:
    """A member of the group: record deliveries, ack each at once; reopen elsewhere when cut off."""
    proc = f"grp-{index}"
    cursor = Cursor(ctx.nodes, index + 1)
    while not extras.consumers_stop.is_set():
        node = cursor.node
        channel = ctx.private_channel(node)
        requests: asyncio.Queue[bus_pb2.SubscribeRequest | None] = asyncio.Queue()
        options = bus_pb2.SubscriptionOptions(
            topic=extras.topic,
            group=GROUP,
            mode=bus_pb2.DELIVERY_MODE_GROUP,
            start=bus_pb2.StartPosition(earliest=True),
            max_in_flight=MAX_IN_FLIGHT,
            ack_deadline=duration_pb2.Duration(seconds=5),
        )
        await requests.put(bus_pb2.SubscribeRequest(open=options))
        ctx.history.record(
            proc,
            "sub_open",
            time.monotonic(),
            args={"group": GROUP, "max_in_flight": MAX_IN_FLIGHT},
            node=node,
        )

        async def outgoing(queue: asyncio.Queue[bus_pb2.SubscribeRequest | None] = requests) -> Any:
            while (item := await queue.get()) is not None:
                yield item

        async def consume(
            channel: grpc.aio.Channel = channel,
            node: str = node,
            queue: asyncio.Queue[bus_pb2.SubscribeRequest | None] = requests,
        ) -> None:
            stub = bus_pb2_grpc.BusStub(channel)
            async for response in stub.Subscribe(outgoing()):
                if not response.deliveries:
                    continue
                got = [[d.message.id, d.message.sequence, d.attempt] for d in response.deliveries]
                ctx.history.record(proc, "deliver", time.monotonic(), result={"deliveries": got}, node=node)
                extras.delivered.update(d.message.id for d in response.deliveries)
                refs = [
                    bus_pb2.MessageRef(topic=d.message.topic or extras.topic, sequence=d.message.sequence)
                    for d in response.deliveries
                ]
                await queue.put(bus_pb2.SubscribeRequest(ack=bus_pb2.Ack(refs=refs)))
                ctx.history.record(
                    proc, "ack", time.monotonic(), args={"sequences": [r.sequence for r in refs]}, node=node
                )

        async def probe(channel: grpc.aio.Channel) -> Any:
            stub = bus_pb2_grpc.BusStub(channel)
            return await stub.GetTopic(bus_pb2.GetTopicRequest(name=extras.topic), timeout=1.5)

        error = await guarded(ctx, node, consume(), probe, extras.consumers_stop)
        await requests.put(None)
        await channel.close()
        if error is None:
            return
        ctx.history.record(proc, "sub_error", time.monotonic(), outcome=UNKNOWN, error=error, node=node)
        cursor.rotate()
        await asyncio.sleep(0.2)


async def _read_topic(ctx: Context, topic: str, within: float) -> tuple[list[list[Any]], dict[str, int]]:
    """Every stored message ``[sequence, id]`` (a broadcast read from the start) and the group's state."""
    cursor = Cursor(ctx.nodes, 0)
    for _ in range(20):
        stub = bus_pb2_grpc.BusStub(ctx.channel(cursor.node))
        try:
            info = (await stub.GetTopic(bus_pb2.GetTopicRequest(name=topic), timeout=CALL_TIMEOUT)).topic
            break
        except grpc.RpcError:
            cursor.rotate()
            await asyncio.sleep(0.5)
    else:
        raise RuntimeError(f"GetTopic {topic} kept failing")
    group = next((g for g in info.groups if g.name == GROUP), None)
    state = {
        "ack_floor": int(group.ack_floor) if group else 0,
        "pending": int(group.pending) if group else 0,
        "in_flight": int(group.in_flight) if group else 0,
        "last_sequence": int(info.last_sequence),
    }
    messages: dict[int, str] = {}
    if info.last_sequence == 0:
        return [], state
    requests: asyncio.Queue[bus_pb2.SubscribeRequest | None] = asyncio.Queue()
    options = bus_pb2.SubscriptionOptions(
        topic=topic, mode=bus_pb2.DELIVERY_MODE_BROADCAST, start=bus_pb2.StartPosition(earliest=True)
    )
    await requests.put(bus_pb2.SubscribeRequest(open=options))

    async def outgoing() -> Any:
        while (item := await requests.get()) is not None:
            yield item

    channel = ctx.private_channel(cursor.node)
    try:
        stub = bus_pb2_grpc.BusStub(channel)
        call = stub.Subscribe(outgoing())

        async def read() -> None:
            async for response in call:
                for delivery in response.deliveries:
                    messages[int(delivery.message.sequence)] = delivery.message.id
                refs = [
                    bus_pb2.MessageRef(topic=topic, sequence=d.message.sequence) for d in response.deliveries
                ]
                if refs:
                    await requests.put(bus_pb2.SubscribeRequest(ack=bus_pb2.Ack(refs=refs)))
                if messages and max(messages) >= info.last_sequence:
                    return

        await asyncio.wait_for(read(), within)
    finally:
        await requests.put(None)
        await channel.close()
    return [[seq, messages[seq]] for seq in sorted(messages)], state


# Sagas ----------------------------------------------------------------------------------------


class Participant:
    """A saga participant: ``Do`` applies an effect once per key, ``Undo`` reverts it once, ``Fail`` fails."""

    def __init__(self, ctx: Context, service: str) -> None:
        self.ctx = ctx
        self.proc = f"part-{service}"
        self.applied: set[tuple[str, str]] = set()
        self.undone: set[tuple[str, str]] = set()

    def _record(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        effective: bool,
        arrived: float | None = None,
    ) -> None:
        meta = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        args = {
            "method": method,
            "saga_id": meta.get("x-saga-id", ""),
            "step": meta.get("x-saga-step", ""),
            "phase": meta.get("x-saga-phase", ""),
            "key": meta.get("x-idempotency-key", ""),
            "effective": effective,
        }
        self.ctx.history.record(
            self.proc,
            "participant_call",
            time.monotonic() if arrived is None else arrived,
            args=args,
            node=context.peer(),
        )

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler (raw bytes in and out: the coordinator needs no descriptors)."""

        def key(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str]:
            meta = dict(context.invocation_metadata() or ())
            return str(meta.get("x-saga-id", "")), str(meta.get("x-saga-step", ""))

        async def apply(context: grpc.aio.ServicerContext[Any, Any], method: str, delay: float) -> bytes:
            arrived = time.monotonic()
            await asyncio.sleep(delay)
            step = key(context)
            if step in self.undone:  # compensated (or compensated ahead of a late call): a tombstone
                self._record(method, context, False, arrived)
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "already compensated")
            effective = step not in self.applied
            self.applied.add(step)
            self._record(method, context, effective, arrived)
            return b""

        async def do(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            return await apply(context, "Do", 0.0)

        async def slow(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            return await apply(context, "Slow", 1.0)

        async def undo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            step = key(context)
            effective = step in self.applied and step not in self.undone
            self.undone.add(step)
            self._record("Undo", context, effective)
            return b""

        async def fail(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            self._record("Fail", context, False)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this step always fails")
            return b""

        return grpc.method_handlers_generic_handler(
            PARTICIPANT,
            {
                name: grpc.unary_unary_rpc_method_handler(fn)
                for name, fn in (("Do", do), ("Slow", slow), ("Undo", undo), ("Fail", fail))
            },
        )


def definition(run: str, kind: str) -> saga_pb2.SagaDefinition:
    """Reserve (pt-pay), ship (pt-ship; 1 s for "abort"), then confirm (pt-pay; Fail for "failing")."""

    def step(name: str, service: str, method: str, compensate: bool) -> saga_pb2.SagaStep:
        result = saga_pb2.SagaStep(
            name=name,
            service=service,
            method=f"/{PARTICIPANT}/{method}",
            timeout=duration_pb2.Duration(seconds=3),
            retry=saga_pb2.RetryPolicy(
                max_attempts=5, initial_backoff=duration_pb2.Duration(nanos=200_000_000)
            ),
        )
        if compensate:
            result.compensation_method = f"/{PARTICIPANT}/Undo"
        else:
            result.no_compensation = True
        return result

    return saga_pb2.SagaDefinition(
        name=f"pt-{run}-{kind}",
        steps=[
            step("reserve", "pt-pay", "Do", True),
            step("ship", "pt-ship", "Slow" if kind == "abort" else "Do", True),
            step("confirm", "pt-pay", "Fail" if kind == "failing" else "Do", False),
        ],
    )


def saga_kind(count: int) -> str:
    """Every third saga fails at its last step, every fifth of the others is aborted mid-way."""
    if count % 3 == 0:
        return "failing"
    return "abort" if count % 5 == 1 else "ok"


async def abort_later(ctx: Context, key: str, saga_id: str, start: int) -> None:
    """Abort the saga 0.3 s into its slow step, through whichever node answers."""
    await asyncio.sleep(0.3)
    cursor = Cursor(ctx.nodes, start)
    for attempt in range(3):
        stub = saga_pb2_grpc.SagaCoordinatorStub(ctx.channel(cursor.node))
        request = saga_pb2.AbortSagaRequest(saga_id=saga_id, reason="aborted by the workload")
        op, response = await record_call(
            ctx,
            "saga-abort",
            "saga_abort",
            cursor.node,
            lambda s=stub, r=request: s.AbortSaga(r, timeout=CALL_TIMEOUT),  # type: ignore[misc]
            {"key": key, "saga_id": saga_id, "attempt": attempt},
            lambda r: {"state": saga_pb2.SagaState.Name(r.saga.state)},
        )
        if response is not None or op.outcome != UNKNOWN:
            return
        cursor.rotate()


async def starter(ctx: Context, extras: Extras) -> None:
    """Start a saga every 0.7 s (without waiting for it); retry an ambiguous start with the same key."""
    proc = "saga-0"
    cursor = Cursor(ctx.nodes, 2)
    count = 0
    while not ctx.stop.is_set():
        count += 1
        key = f"{ctx.run}-{count}"
        kind = saga_kind(count)
        extras.sagas[key] = kind
        for attempt in range(3):
            stub = saga_pb2_grpc.SagaCoordinatorStub(ctx.channel(cursor.node))
            request = saga_pb2.StartSagaRequest(definition=definition(ctx.run, kind), idempotency_key=key)
            op, response = await record_call(
                ctx,
                proc,
                "saga_start",
                cursor.node,
                lambda s=stub, r=request: s.StartSaga(r, timeout=CALL_TIMEOUT),  # type: ignore[misc]
                {"key": key, "kind": kind, "fail_last": kind == "failing", "attempt": attempt},
                lambda r: {"saga_id": r.saga.saga_id, "created": r.created},
            )
            if response is not None:
                extras.saga_ids[key] = response.saga.saga_id
            if response is not None and kind == "abort":
                task = asyncio.create_task(abort_later(ctx, key, response.saga.saga_id, cursor.index + 1))
                extras.aborts.add(task)
                task.add_done_callback(extras.aborts.discard)
            if response is not None or op.outcome != UNKNOWN:
                break
            cursor.rotate()
        await ctx.sleep(0.7)
    await asyncio.gather(*extras.aborts, return_exceptions=True)


async def _saga_outcome(
    ctx: Context, key: str, kind: str, saga_id: str, deadline: float
) -> tuple[str, dict[str, Any]]:
    """Wait for the saga to end; without its id (an ambiguous start) a repeated start finds it."""
    cursor = Cursor(ctx.nodes, 0)
    saga: saga_pb2.Saga | None = None
    deadline = max(deadline, time.monotonic() + 5.0)  # each saga gets a few tries, however late
    while time.monotonic() < deadline:
        stub = saga_pb2_grpc.SagaCoordinatorStub(ctx.channel(cursor.node))
        try:
            if not saga_id:
                request = saga_pb2.StartSagaRequest(definition=definition(ctx.run, kind), idempotency_key=key)
                saga = (await stub.StartSaga(request, timeout=CALL_TIMEOUT)).saga
                saga_id = saga.saga_id
            wait = max(0.5, min(10.0, deadline - time.monotonic()))
            saga = (
                await stub.GetSaga(
                    saga_pb2.GetSagaRequest(saga_id=saga_id, wait=duration_pb2.Duration(seconds=int(wait))),
                    timeout=wait + CALL_TIMEOUT,
                )
            ).saga
        except grpc.RpcError:
            cursor.rotate()
            await asyncio.sleep(0.3)
            continue
        if saga.state not in (
            saga_pb2.SAGA_STATE_RUNNING,
            saga_pb2.SAGA_STATE_COMPENSATING,
            saga_pb2.SAGA_STATE_ABORTING,
        ):
            break
    state = saga_pb2.SagaState.Name(saga.state) if saga is not None else "NOT_FOUND"
    steps = [{"name": s.name, "state": saga_pb2.StepState.Name(s.state)} for s in saga.steps] if saga else []
    summary = {"key": key, "kind": kind, "fail_last": kind == "failing", "state": state, "steps": steps}
    return saga_id or f"unknown-{key}", summary


# The Bus and saga parts' lifecycle --------------------------------------------------------------


async def start(ctx: Context, kinds: tuple[str, ...]) -> Extras:
    """Create the topic and start the participant hosts (registered before the sagas start)."""
    extras = Extras(kinds=kinds)
    if "bus" in kinds:
        extras.topic = f"pt-{ctx.run}"
        await _create_topic(ctx, extras.topic)
    if "saga" in kinds:
        for service in SERVICES:
            participant = Participant(ctx, service)
            host = ServiceHost(
                ServiceHostConfig(
                    service=service, registry=ctx.nodes, host=ctx.listen_host, ttl=6.0, grace=1.0
                )
            )
            host.add_servicer(
                lambda handler, server: server.add_generic_rpc_handlers((handler,)), participant.handler()
            )
            await host.start()
            extras.hosts.append(host)
    return extras


def tasks(ctx: Context, extras: Extras) -> list[asyncio.Task[None]]:
    """The running tasks (consumers are kept apart: they run on into the final phase)."""
    started: list[asyncio.Task[None]] = []
    if "bus" in extras.kinds:
        extras.consumers = [asyncio.create_task(consumer(ctx, extras, i)) for i in range(2)]
        started += [asyncio.create_task(publisher(ctx, extras, i)) for i in range(2)]
    if "saga" in extras.kinds:
        started.append(asyncio.create_task(starter(ctx, extras)))
    return started


async def final(ctx: Context, extras: Extras, within: float = 90.0) -> dict[str, Any]:
    """Drain the group, read the topic back, wait for every saga to end."""
    result: dict[str, Any] = {}
    deadline = time.monotonic() + within
    if "bus" in extras.kinds:
        while not extras.published <= extras.delivered and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        drained = extras.published <= extras.delivered
        await asyncio.sleep(1.0)  # the last acks reach the store
        extras.consumers_stop.set()
        await asyncio.gather(*extras.consumers, return_exceptions=True)
        messages, state = await _read_topic(ctx, extras.topic, max(60.0, deadline - time.monotonic()))
        result["bus"] = {"topic": extras.topic, "messages": messages, "drained": drained, **state}
    if "saga" in extras.kinds:
        limit = asyncio.Semaphore(32)

        async def outcome(key: str, kind: str) -> tuple[str, dict[str, Any]]:
            async with limit:
                return await _saga_outcome(ctx, key, kind, extras.saga_ids.get(key, ""), deadline)

        outcomes = await asyncio.gather(*(outcome(key, kind) for key, kind in extras.sagas.items()))
        result["sagas"] = dict(outcomes)
    return result


async def close(extras: Extras) -> None:
    """Stop the consumers (if the final phase did not) and the participant hosts."""
    extras.consumers_stop.set()
    for task in extras.consumers:
        task.cancel()
    await asyncio.gather(*extras.consumers, return_exceptions=True)
    for host in extras.hosts:
        with contextlib.suppress(Exception):
            await host.stop(grace=0.5)
