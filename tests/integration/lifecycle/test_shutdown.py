"""SIGINT/SIGTERM on a real `rpcmesh up` with idle and busy streams of every service attached.

Each trial draws, from a seeded generator, the signal and the moment it lands while traffic
runs; the control plane must exit 0 well within its grace period (open streams end at once,
they do not hold the shutdown), and a Bus group's acknowledged progress must survive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from rpcmesh.v1 import (
    bus_pb2,
    bus_pb2_grpc,
    eventstore_pb2,
    eventstore_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    saga_pb2,
    saga_pb2_grpc,
)

from tests.support.processes import ManagedProcess, rpcmesh_command, start_control_plane

pytestmark = [pytest.mark.fault, pytest.mark.slow]

GRACE = 8.0
"""--grace of the control planes here: generous, so that waiting it out shows."""

PROMPT = 6.0
"""Seconds a shutdown may take: streams end at once, so it never needs the grace period."""

SEED = 20261204
TRIALS = 2

Traffic = Callable[[grpc.aio.Channel, list[asyncio.Task[Any]]], Awaitable[None]]


def _spawn(tasks: list[asyncio.Task[Any]], coro: Awaitable[Any]) -> None:
    tasks.append(asyncio.ensure_future(coro))


async def _drain(stream: AsyncIterator[Any]) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for _ in stream:
            pass


async def _forever(step: Callable[[], Awaitable[Any]]) -> None:
    while True:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await step()
        await asyncio.sleep(0.01)


def _ttl(seconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds)


async def registry_traffic(channel: grpc.aio.Channel, tasks: list[asyncio.Task[Any]]) -> None:
    """Idle and busy Watch, idle and busy KeepAlive, Register/Deregister churn."""
    stub = registry_pb2_grpc.RegistryStub(channel)
    leases = []
    for name in ("quiet", "busy"):
        instance = registry_pb2.Instance(service=name, address="127.0.0.1:1")
        leases.append(await stub.Register(registry_pb2.RegisterRequest(instance=instance, ttl=_ttl(30))))
    _spawn(tasks, _drain(stub.Watch(registry_pb2.WatchRequest(service="nobody-registers-this"))))
    _spawn(tasks, _drain(stub.Watch(registry_pb2.WatchRequest())))

    async def idle_keepalive() -> AsyncIterator[registry_pb2.KeepAliveRequest]:
        yield registry_pb2.KeepAliveRequest(lease_id=leases[0].lease_id, lease_token=leases[0].lease_token)
        await asyncio.Event().wait()

    async def busy_keepalive() -> AsyncIterator[registry_pb2.KeepAliveRequest]:
        while True:
            yield registry_pb2.KeepAliveRequest(
                lease_id=leases[1].lease_id, lease_token=leases[1].lease_token
            )
            await asyncio.sleep(0.02)

    _spawn(tasks, _drain(stub.KeepAlive(idle_keepalive())))
    _spawn(tasks, _drain(stub.KeepAlive(busy_keepalive())))

    async def churn() -> None:
        instance = registry_pb2.Instance(service="churn", address="127.0.0.1:2")
        got = await stub.Register(registry_pb2.RegisterRequest(instance=instance, ttl=_ttl(30)))
        await stub.Deregister(
            registry_pb2.DeregisterRequest(
                service="churn", instance_id=got.instance_id, lease_token=got.lease_token
            )
        )

    _spawn(tasks, _forever(churn))


async def bus_traffic(channel: grpc.aio.Channel, tasks: list[asyncio.Task[Any]]) -> None:
    """Idle and busy group subscribers, a broadcast subscriber, idle and busy publish streams."""
    stub = bus_pb2_grpc.BusStub(channel)
    for topic in ("work", "idle"):
        await stub.Publish(bus_pb2.PublishRequest(topic=topic, messages=[bus_pb2.BusMessage(payload=b"0")]))

    def subscribe(topic: str, group: str, *, ack: bool) -> None:
        mode = bus_pb2.DELIVERY_MODE_GROUP if group else bus_pb2.DELIVERY_MODE_BROADCAST
        options = bus_pb2.SubscriptionOptions(
            topic=topic, group=group, mode=mode, start=bus_pb2.StartPosition(earliest=True)
        )
        acks: asyncio.Queue[bus_pb2.SubscribeRequest] = asyncio.Queue()

        async def requests() -> AsyncIterator[bus_pb2.SubscribeRequest]:
            yield bus_pb2.SubscribeRequest(open=options)
            while True:
                yield await acks.get()

        async def run() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for response in stub.Subscribe(requests()):
                    refs = [
                        bus_pb2.MessageRef(topic=d.message.topic, sequence=d.message.sequence)
                        for d in response.deliveries
                    ]
                    if ack and refs:
                        acks.put_nowait(bus_pb2.SubscribeRequest(ack=bus_pb2.Ack(refs=refs)))

        _spawn(tasks, run())

    subscribe("idle", "quiet-group", ack=True)
    subscribe("work", "workers", ack=True)
    subscribe("work", "", ack=False)

    async def idle_publisher() -> AsyncIterator[bus_pb2.PublishStreamRequest]:
        await asyncio.Event().wait()
        yield bus_pb2.PublishStreamRequest()

    async def busy_publisher() -> AsyncIterator[bus_pb2.PublishStreamRequest]:
        batch = 0
        while True:
            batch += 1
            yield bus_pb2.PublishStreamRequest(
                batch_id=batch, topic="work", messages=[bus_pb2.BusMessage(payload=b"%d" % batch)]
            )
            await asyncio.sleep(0.005)

    async def publish() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for response in stub.PublishStream(busy_publisher()):
                ACKNOWLEDGED["work"] = max(
                    ACKNOWLEDGED.get("work", 0), *(r.sequence for r in response.results)
                )

    _spawn(tasks, _drain(stub.PublishStream(idle_publisher())))
    _spawn(tasks, publish())


async def eventstore_traffic(channel: grpc.aio.Channel, tasks: list[asyncio.Task[Any]]) -> None:
    """An idle stream subscription, a busy subscription to all, appends."""
    stub = eventstore_pb2_grpc.EventStoreStub(channel)
    _spawn(tasks, _drain(stub.SubscribeToStream(eventstore_pb2.SubscribeToStreamRequest(stream="silent"))))
    _spawn(tasks, _drain(stub.SubscribeToAll(eventstore_pb2.SubscribeToAllRequest())))

    async def append() -> None:
        await stub.AppendToStream(
            eventstore_pb2.AppendToStreamRequest(
                stream="orders",
                events=[eventstore_pb2.EventData(type="placed", data=b"{}", content_type="application/json")],
            )
        )

    _spawn(tasks, _forever(append))


async def saga_traffic(channel: grpc.aio.Channel, tasks: list[asyncio.Task[Any]]) -> None:
    """WatchSaga on running sagas (their step's service is never there, so they keep retrying)."""
    stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
    step = saga_pb2.SagaStep(
        name="call",
        service="absent-service",
        method="/absent.v1.Absent/Do",
        no_compensation=True,
        request=saga_pb2.PayloadTemplate(base_from="input"),
        retry=saga_pb2.RetryPolicy(initial_backoff=duration_pb2.Duration(nanos=20_000_000)),
    )
    definition = saga_pb2.SagaDefinition(name="waits", steps=[step])
    await stub.RegisterDefinition(saga_pb2.RegisterDefinitionRequest(definition=definition))

    async def start_and_watch() -> None:
        started = await stub.StartSaga(saga_pb2.StartSagaRequest(definition_name="waits", input=b"{}"))
        _spawn(tasks, _drain(stub.WatchSaga(saga_pb2.WatchSagaRequest(saga_id=started.saga.saga_id))))

    await start_and_watch()
    _spawn(tasks, _forever(start_and_watch))


ACKNOWLEDGED: dict[str, int] = {}
"""The highest sequence a publish stream had confirmed, per topic (reset by each trial)."""

SERVICES: dict[str, Traffic] = {
    "registry": registry_traffic,
    "bus": bus_traffic,
    "eventstore": eventstore_traffic,
    "saga": saga_traffic,
}


async def _ack_floor(channel: grpc.aio.Channel, topic: str, group: str) -> int:
    info = await bus_pb2_grpc.BusStub(channel).GetTopic(bus_pb2.GetTopicRequest(name=topic), timeout=10)
    return next((g.ack_floor for g in info.topic.groups if g.name == group), 0)


async def _wait_exit(plane: ManagedProcess, limit: float) -> tuple[int | None, float]:
    started = time.monotonic()
    try:
        code: int | None = await asyncio.to_thread(plane.proc.wait, limit)
    except subprocess.TimeoutExpired:
        code = None
    return code, time.monotonic() - started


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_signal_under_stream_traffic_exits_promptly(service: str, tmp_path: Path) -> None:
    rng = random.Random(f"{SEED}-{service}")
    for trial in range(TRIALS):
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        delay = rng.uniform(0.0, 1.0)
        about = f"seed={SEED} service={service} trial={trial} signal={sig.name} after={delay:.2f}s"
        data_dir = tmp_path / f"trial-{trial}"
        plane, address = start_control_plane(data_dir, "--grace", str(GRACE))
        tasks: list[asyncio.Task[Any]] = []
        ACKNOWLEDGED.clear()
        channel = grpc.aio.insecure_channel(address)
        try:
            await SERVICES[service](channel, tasks)
            await asyncio.sleep(delay)
            floor = await _ack_floor(channel, "work", "workers") if service == "bus" else 0
            plane.signal(sig)
            code, took = await _wait_exit(plane, GRACE + 10)
            assert code == 0 and took < PROMPT, (
                f"{about}: exit code {code} after {took:.1f}s (limit {PROMPT}s)\n{plane.output()}"
            )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await channel.close()
            plane.kill()
        if service == "bus":
            again, address = start_control_plane(data_dir)
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    kept = await _ack_floor(channel, "work", "workers")
                    topic = await bus_pb2_grpc.BusStub(channel).GetTopic(bus_pb2.GetTopicRequest(name="work"))
                assert kept >= floor, (
                    f"{about}: ack floor {floor} before the signal, {kept} after the restart"
                )
                published = ACKNOWLEDGED.get("work", 0)
                last = topic.topic.last_sequence
                assert last >= published, (
                    f"{about}: sequence {published} was confirmed; the topic ends at {last}"
                )
            finally:
                again.kill()


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    """A unary call holds the shutdown for its grace period; a second signal cuts it short."""
    plane, address = start_control_plane(tmp_path / "data", "--grace", "30")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = bus_pb2_grpc.BusStub(channel)
            await stub.Publish(bus_pb2.PublishRequest(topic="asks", messages=[bus_pb2.BusMessage()]))
            options = bus_pb2.SubscriptionOptions(
                topic="asks", mode=bus_pb2.DELIVERY_MODE_BROADCAST, start=bus_pb2.StartPosition(new_only=True)
            )

            async def silent_responder() -> AsyncIterator[bus_pb2.SubscribeRequest]:
                yield bus_pb2.SubscribeRequest(open=options)
                await asyncio.Event().wait()

            responder = stub.Subscribe(silent_responder())
            await responder.read()  # opened
            request = stub.Request(
                bus_pb2.RequestRequest(
                    topic="asks", message=bus_pb2.BusMessage(payload=b"?"), timeout=_ttl(60)
                )
            )
            await asyncio.sleep(0.5)
            assert not request.done(), f"the request ended early: {await request.code()}"
            plane.signal(signal.SIGTERM)
            code, took = await _wait_exit(plane, 1.5)
            assert code is None, f"exited ({code}) although a call had 30 s to finish\n{plane.output()}"
            plane.signal(signal.SIGINT)
            code, took = await _wait_exit(plane, 3.0)
            assert code == 128 + signal.SIGINT, f"exit code {code} {took:.1f}s after the second signal"
            request.cancel()
            responder.cancel()
    finally:
        plane.kill()


def test_idle_cli_group_subscriber_does_not_hold_shutdown(tmp_path: Path) -> None:
    """The issue's case: `rpcmesh subscribe T --group g` attached, nothing to deliver, then a signal."""
    rng = random.Random(SEED)
    for trial in range(3):
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        delay = rng.uniform(0.0, 0.5)
        about = f"seed={SEED} trial={trial} signal={sig.name} after={delay:.2f}s"
        plane, address = start_control_plane(tmp_path / f"trial-{trial}", "--grace", str(GRACE))
        subscriber = None
        try:
            published = ManagedProcess(rpcmesh_command("publish", "T", "--data", "{}", "--target", address))
            try:
                assert published.proc.wait(timeout=30) == 0, published.output()
            finally:
                published.kill()
            subscriber = ManagedProcess(
                rpcmesh_command("subscribe", "T", "--group", "g", "--from", "earliest", "--target", address)
            )
            subscriber.wait_for_line(r"^T\t1\t")
            time.sleep(delay)
            plane.signal(sig)
            started = time.monotonic()
            try:
                code = plane.proc.wait(timeout=GRACE + 10)
            except subprocess.TimeoutExpired:
                code = None
            took = time.monotonic() - started
            assert code == 0 and took < PROMPT, (
                f"{about}: exit code {code} after {took:.1f}s\n{plane.output()}"
            )
        finally:
            if subscriber is not None:
                subscriber.kill()
            plane.kill()
