"""After a stream that worked, the Subscriber's reconnect backoff starts again from its first delay.

Before, the delay was reset only by a stream that ended cleanly, which a broken one never does: each
control-plane restart left the delay where the last outage had pushed it, so after a few rolling
restarts every reconnect waited the 5 s maximum. The control plane (a real process) is killed and
restarted several times, each time after the subscription had worked for a while; the first delay
chosen after each break is read from the subscriber's log line.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from pathlib import Path

import grpc.aio
import pytest

from rpcmesh.bus import Received, Subscriber, SubscriberConfig
from rpcmesh.bus.subscriber import HEALTHY_STREAM_S
from tests.support.processes import ManagedProcess, start_control_plane

RESTARTS = 3
LINE = re.compile(r"broke \((?P<why>.*)\) after (?P<open>[0-9.]+)s open; reopening in (?P<delay>[0-9.]+)s")


@pytest.mark.fault
async def test_the_reconnect_delay_starts_again_after_a_stream_that_worked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rpcmesh.bus.subscriber")
    data = tmp_path / "plane"
    plane, address = start_control_plane(data)
    port = int(address.rsplit(":", 1)[1])
    planes: list[ManagedProcess] = [plane]

    async def handle(_: Received) -> None:
        return None

    config = SubscriberConfig(topic=f"backoff{uuid.uuid4().hex[:8]}.x", group="g", reconnect_backoff=0.1)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            subscriber = Subscriber(channel, config, handle)
            await subscriber.start()
            try:
                for _ in range(RESTARTS):
                    await asyncio.sleep(HEALTHY_STREAM_S + 0.5)  # the stream works for a while
                    planes[-1].kill()
                    await asyncio.sleep(0.6)  # an outage long enough for several failed attempts
                    planes.append(start_control_plane(data, port=port)[0])
                    await asyncio.wait_for(subscriber._opened.wait(), 15)
            finally:
                await subscriber.stop()
    finally:
        for proc in planes:
            proc.kill()
    chosen = [
        (float(m["open"]), float(m["delay"])) for r in caplog.records if (m := LINE.search(r.getMessage()))
    ]
    after_working = [delay for opened, delay in chosen if opened >= HEALTHY_STREAM_S]
    assert len(after_working) == RESTARTS, chosen
    assert after_working == [config.reconnect_backoff] * RESTARTS, chosen
    # Within an outage the delay still doubles.
    assert any(delay > config.reconnect_backoff for opened, delay in chosen if opened == 0.0), chosen
