"""Fault tests with real processes: subscribers, responders and the Bus itself killed with kill -9."""

from __future__ import annotations

import asyncio
import collections
import sys
import time
from pathlib import Path

import grpc.aio
import pytest
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc

from rpcmesh.bus import request
from rpcmesh.errors import StatusError
from tests.integration.bus.streams import RawSubscriber, options
from tests.support.processes import ManagedProcess, python_env, start_control_plane

pytestmark = [pytest.mark.fault, pytest.mark.slow]


def worker(*args: str) -> ManagedProcess:
    proc = ManagedProcess([sys.executable, "-m", "tests.integration.bus.workers", *args], env=python_env())
    try:
        proc.wait_for_line("ready", timeout=30)
    except BaseException:
        proc.kill()
        raise
    return proc


async def wait_for_floor(stub: bus_pb2_grpc.BusStub, topic: str, floor: int, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        info = (await stub.GetTopic(bus_pb2.GetTopicRequest(name=topic))).topic
        if info.groups and info.groups[0].ack_floor >= floor:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"ack floor of {topic} stuck at {info.groups[0].ack_floor if info.groups else 0}")


async def test_subscriber_killed_repeatedly_loses_nothing(tmp_path: Path) -> None:
    total, window, kills = 10_000, 50, 0
    bus, address = start_control_plane(tmp_path / "data")
    outfile = tmp_path / "processed.txt"
    current: ManagedProcess | None = None
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = bus_pb2_grpc.BusStub(channel)
            current = worker("subscribe", address, "jobs", "workers", str(outfile), str(window))

            async def produce() -> None:
                for start in range(0, total, 250):
                    messages = [
                        bus_pb2.BusMessage(payload=str(i).encode()) for i in range(start, start + 250)
                    ]
                    await stub.Publish(bus_pb2.PublishRequest(topic="jobs", messages=messages))
                    await asyncio.sleep(0.02)

            producer = asyncio.create_task(produce())
            while not producer.done() or kills < 5:
                await asyncio.sleep(0.4)
                current.kill()
                kills += 1
                current = worker("subscribe", address, "jobs", "workers", str(outfile), str(window))
                if kills >= 12:
                    break
            await producer
            await wait_for_floor(stub, "jobs", total, within=60)
    finally:
        if current is not None:
            current.kill()
        bus.kill()
    counts = collections.Counter(int(line) for line in outfile.read_text().split())
    assert set(counts) == set(range(total)), f"lost {sorted(set(range(total)) - set(counts))[:10]}"
    duplicates = sum(counts.values()) - total
    assert duplicates <= kills * window, (duplicates, kills)


async def test_bus_killed_while_publishing_keeps_every_acknowledged_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    bus, address = start_control_plane(data)
    acknowledged: set[str] = set()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = bus_pb2_grpc.BusStub(channel)

            async def produce(lane: int) -> None:
                for batch in range(10_000):
                    ids = [f"{lane}-{batch}-{i}" for i in range(20)]
                    messages = [bus_pb2.BusMessage(id=i, payload=i.encode()) for i in ids]
                    try:
                        await stub.Publish(
                            bus_pb2.PublishRequest(topic="orders", messages=messages), timeout=5
                        )
                    except grpc.aio.AioRpcError:
                        return
                    acknowledged.update(ids)

            producers = [asyncio.create_task(produce(lane)) for lane in range(4)]
            while len(acknowledged) < 3000:  # noqa: ASYNC110 - polling a set filled by other tasks
                await asyncio.sleep(0.05)
            bus.kill()
            await asyncio.gather(*producers)
    finally:
        bus.kill()
    assert acknowledged
    bus, address = start_control_plane(data)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = bus_pb2_grpc.BusStub(channel)
            sub = RawSubscriber(stub, options("orders", "audit", max_in_flight=5000))
            await sub.opened()
            seen: set[str] = set()
            try:
                while not acknowledged <= seen:
                    got = await sub.receive(1, within=20)
                    seen.update(d.message.id for d in got)
                    sub.ack(got)
            finally:
                await sub.close()
            assert acknowledged <= seen
    finally:
        bus.kill()


async def test_responders_killed_never_misroute_replies(tmp_path: Path) -> None:
    bus, address = start_control_plane(tmp_path / "data")
    responders: list[ManagedProcess] = []
    try:
        responders = [worker("respond", address, "echo") for _ in range(3)]
        # The control plane admits 256 calls per connection: spread the
        # 1,000 concurrent requests over five connections.
        channels = [grpc.aio.insecure_channel(address) for _ in range(5)]
        try:

            async def ask(index: int) -> tuple[str, str | None]:
                payload = f"request-{index}"
                try:
                    reply = await request(channels[index % 5], "echo", payload, within=8.0)
                except StatusError as exc:
                    return payload, exc.code.name
                return payload, reply.payload.decode()

            calls = asyncio.gather(*[ask(i) for i in range(1000)])
            for round_ in range(4):
                await asyncio.sleep(0.3)
                victim = responders[round_ % len(responders)]
                victim.kill()
                responders[round_ % len(responders)] = worker("respond", address, "echo")
            results = await calls
        finally:
            for channel in channels:
                await channel.close()
    finally:
        for proc in responders:
            proc.kill()
        bus.kill()
    answered = [(sent, got) for sent, got in results if got is not None and got.startswith("request-")]
    wrong = [(sent, got) for sent, got in answered if sent != got]
    assert wrong == []
    failures = collections.Counter(
        got for _, got in results if got is not None and not got.startswith("request-")
    )
    assert set(failures) <= {"DEADLINE_EXCEEDED", "UNAVAILABLE"}, failures
    assert len(answered) > 0
