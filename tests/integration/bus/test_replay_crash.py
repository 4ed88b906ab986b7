"""A dead-letter replay cut short by kill -9 and retried delivers each dead letter once, to its group only.

Replay republishes (an id derived from the dead letter) and then deletes the dead letter; the
control plane is killed at a seeded random moment while a replay of many dead letters runs, restarted
on the same port and data, and the replay retried. The replayed group must then receive every dead
letter exactly once, and the other group nothing. On SQLite and on NATS JetStream. (Copies that the
killed plane had already fetched for the group come back once their ack deadline passes.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
from pathlib import Path

import grpc
import grpc.aio
import pytest
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc

from tests.integration.bus.streams import RawSubscriber, options
from tests.support import backends
from tests.support.processes import ManagedProcess, start_control_plane

pytestmark = [pytest.mark.fault]

SEED = int(os.environ.get("RPCMESH_FAULT_SEED", random.randrange(1 << 30)))
TRIALS = int(os.environ.get("RPCMESH_REPLAY_CRASH_TRIALS", "4"))
DEAD = 40
ACK_DEADLINE_MS = 2000


async def _dead_letters(stub: bus_pb2_grpc.BusStub, topic: str) -> list[bus_pb2.DeadLetter]:
    listed = await stub.ListDeadLetters(
        bus_pb2.ListDeadLettersRequest(topic=topic, group="g", page_size=1000)
    )
    return list(listed.dead_letters)


async def _bury_all(stub: bus_pb2_grpc.BusStub, topic: str) -> None:
    """DEAD messages: group g terms them all, group other acks them all."""
    messages = [bus_pb2.BusMessage(id=f"m{i}", payload=str(i).encode()) for i in range(DEAD)]
    await stub.Publish(bus_pb2.PublishRequest(topic=topic, messages=messages))
    for group in ("g", "other"):
        sub = RawSubscriber(stub, options(topic, group, ack_deadline_ms=ACK_DEADLINE_MS))
        try:
            await sub.opened()
            got = await sub.receive(DEAD)
            if group == "g":
                sub.term(got, "poison")
            else:
                sub.ack(got)
            await asyncio.sleep(0.3)
        finally:
            await sub.close()
    for _ in range(100):
        if len(await _dead_letters(stub, topic)) == DEAD:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {len(await _dead_letters(stub, topic))} dead letters")


async def _drain(stub: bus_pb2_grpc.BusStub, topic: str, group: str, expect: int) -> list[bus_pb2.Delivery]:
    """What ``group`` receives: until ``expect`` came and a second passed quietly, or a long quiet spell."""
    sub = RawSubscriber(stub, options(topic, group, ack_deadline_ms=ACK_DEADLINE_MS))
    try:
        await sub.opened()
        got: list[bus_pb2.Delivery] = []
        quiet = 0
        # Copies the killed plane had fetched come back once their ack deadline passes.
        while quiet < (1 if len(got) >= expect else ACK_DEADLINE_MS // 1000 + 3):
            more = await sub.nothing(1.0)
            quiet = 0 if more else quiet + 1
            got += more
        sub.ack(got)
        await asyncio.sleep(0.2)
        return got
    finally:
        await sub.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("nats", marks=pytest.mark.backend)])
async def test_a_replay_killed_midway_and_retried_delivers_each_dead_letter_once(
    backend: str, tmp_path: Path, prefix: str
) -> None:
    extra = ("--bus", backends.nats_url()) if backend == "nats" else ()
    rand = random.Random(SEED)
    for trial in range(TRIALS):
        data = tmp_path / f"t{trial}"
        topic = f"{prefix}.replay{trial}.orders"  # the prefix fixture deletes them from NATS afterwards
        plane, address = start_control_plane(data, *extra)
        port = int(address.rsplit(":", 1)[1])
        replacement: ManagedProcess | None = None
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = bus_pb2_grpc.BusStub(channel)
                await _bury_all(stub, topic)
                replay = asyncio.ensure_future(
                    stub.ReplayDeadLetters(
                        bus_pb2.ReplayDeadLettersRequest(topic=topic, group="g"), timeout=10
                    )
                )
                await asyncio.sleep(rand.uniform(0.0, 0.1))  # before, during or after the replay
                plane.kill()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await replay
            replacement, _ = start_control_plane(data, *extra, port=port)
            async with grpc.aio.insecure_channel(address) as channel:
                stub = bus_pb2_grpc.BusStub(channel)
                left = await _dead_letters(stub, topic)
                if left:
                    await stub.ReplayDeadLetters(
                        bus_pb2.ReplayDeadLettersRequest(topic=topic, group="g"), timeout=10
                    )
                assert await _dead_letters(stub, topic) == [], f"seed {SEED} trial {trial}"
                delivered = await _drain(stub, topic, "g", DEAD)
                counts = collections.Counter(int(d.message.payload) for d in delivered)
                assert set(counts) == set(range(DEAD)), (
                    f"lost {sorted(set(range(DEAD)) - set(counts))} (seed {SEED}, trial {trial})"
                )
                twice = {k: n for k, n in counts.items() if n > 1}
                assert not twice, f"delivered more than once: {twice} (seed {SEED}, trial {trial})"
                leaked = await _drain(stub, topic, "other", 0)
                assert leaked == [], f"the other group got {len(leaked)} (seed {SEED}, trial {trial})"
        finally:
            plane.kill()
            if replacement is not None:
                replacement.kill()
