"""Bus clients across control-plane restarts (kill -9 or SIGTERM) at random moments.

A group :class:`Subscriber` and a :class:`Publisher` stay attached to a control plane that is
restarted on the same port and data dir while messages flow. While the plane is down another
gRPC server (one without the Bus, as during a botched rolling restart) holds the port until the
subscriber has been answered UNIMPLEMENTED by it. After every restart the publisher must publish
again (no publish may hang: each one fails or succeeds) and the subscriber must receive what was
published after the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from pathlib import Path

import grpc
import grpc.aio
import pytest

from rpcmesh.bus import Publisher, Received, Subscriber, SubscriberConfig
from rpcmesh.errors import RpcMeshError
from tests.support.processes import ManagedProcess, start_control_plane

SEED = int(os.environ.get("RPCMESH_FAULT_SEED", "20261204"))
TRIALS = 3
WITHIN = 12.0
"""Seconds a client may take to be back in service after a restart."""


async def stop_plane(plane: ManagedProcess, how: signal.Signals) -> None:
    if how is signal.SIGKILL:
        plane.kill()
        return
    code = await asyncio.to_thread(plane.terminate, 15)
    assert code == 0, f"the control plane exited {code} on SIGTERM:\n{plane.output()[-2000:]}"


async def squat(port: int, subscriber: Subscriber, about: str) -> None:
    """Serve no Bus on ``port`` until the subscriber was answered UNIMPLEMENTED (a non-retryable code)."""
    impostor = grpc.aio.server()
    impostor.add_insecure_port(f"127.0.0.1:{port}")
    await impostor.start()
    try:
        deadline = asyncio.get_running_loop().time() + WITHIN
        while subscriber.error is None or subscriber.error.code is not grpc.StatusCode.UNIMPLEMENTED:
            assert asyncio.get_running_loop().time() < deadline, (
                f"the subscriber never met the impostor: {about}"
            )
            await asyncio.sleep(0.02)
    finally:
        await impostor.stop(None)


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_subscriber_and_publisher_carry_on_after_restarts_and_an_impostor_on_the_port(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    data_dir = tmp_path / "plane"
    plane, address = start_control_plane(data_dir)
    port = int(address.rsplit(":", 1)[1])
    received: set[str] = set()
    arrived = asyncio.Event()
    hung: list[str] = []

    async def handle(delivery: Received) -> None:
        received.add(delivery.message.payload.decode())
        arrived.set()

    async def tick(publisher: Publisher) -> None:
        # Traffic at the moment of each restart: acks, deliveries and batches in flight.
        for n in range(1_000_000):
            try:
                async with asyncio.timeout(WITHIN):
                    await publisher.publish("ticks", f"tick-{n}".encode())
            except TimeoutError:
                hung.append(f"tick-{n}")
            except RpcMeshError:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.02)

    async def publish_until_accepted(publisher: Publisher, payload: str, about: str) -> None:
        deadline = asyncio.get_running_loop().time() + WITHIN
        while True:
            try:
                async with asyncio.timeout(WITHIN):
                    await publisher.publish("ticks", payload.encode())
                return
            except TimeoutError:
                raise AssertionError(f"a publish hung: {about}") from None
            except RpcMeshError as exc:
                assert asyncio.get_running_loop().time() < deadline, f"publisher not back: {exc!r}; {about}"
                await asyncio.sleep(0.1)

    # Reconnect backoff kept short so the trials measure the clients, not gRPC's 1 s+ default.
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
    sub_channel = grpc.aio.insecure_channel(address, options=options)
    pub_channel = grpc.aio.insecure_channel(address, options=options)
    config = SubscriberConfig(topic="ticks", group="g", reconnect_backoff=0.05, ack_deadline=5.0)
    subscriber = Subscriber(sub_channel, config, handle)
    publisher = Publisher(pub_channel)
    ticker: asyncio.Task[None] | None = None
    try:
        await subscriber.start()
        ticker = asyncio.create_task(tick(publisher))
        for trial in range(TRIALS):
            how = signal.SIGKILL if trial % 2 == 0 else signal.SIGTERM
            offset = rng.uniform(0.2, 1.2)
            down_for = rng.uniform(0, 0.3)
            about = (
                f"seed={SEED} trial={trial} signal={how.name} offset={offset:.3f}s down_for={down_for:.3f}s"
            )
            await asyncio.sleep(offset)
            await stop_plane(plane, how)
            await asyncio.sleep(down_for)
            subscriber.error = None  # squat waits for a fresh UNIMPLEMENTED
            await squat(port, subscriber, about)
            plane, _ = await asyncio.to_thread(start_control_plane, data_dir, port=port)
            marker = f"after-restart-{trial}"
            await publish_until_accepted(publisher, marker, about)
            deadline = asyncio.get_running_loop().time() + WITHIN
            while marker not in received:
                remaining = deadline - asyncio.get_running_loop().time()
                assert remaining > 0, f"subscriber did not receive {marker}: {about}"
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), remaining)
            assert hung == [], f"publishes hung: {hung[:5]}; {about}"
    finally:
        try:
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            await subscriber.stop()
            await publisher.close()
            await sub_channel.close()
            await pub_channel.close()
        finally:
            plane.kill()
