"""PostgreSQL group commit pacing: callers that come back one by one share the next commit.

The writer waits for as many appends as its recent groups had, so one statement and commit
serve them all; a lone caller's wait is bounded by ``group_wait``.
"""

from __future__ import annotations

import asyncio
import time

from rpcmesh.controlplane.eventstore.model import NO_STREAM, NewEvent
from rpcmesh.controlplane.eventstore.postgres import PostgresEventStorage

CALLERS = 8


def _event() -> NewEvent:
    return NewEvent(event_id=NewEvent.new_id(), event_type="T", id_assigned=True)


async def test_callers_arriving_one_by_one_share_one_commit(postgres_url: str) -> None:
    # A long wait makes the test independent of the machine's speed: the writer commits
    # when the queue holds as many appends as the last group, never because time ran out.
    storage = PostgresEventStorage(postgres_url, group_wait=30.0)
    await storage.open()
    try:
        first = await asyncio.gather(
            *(storage.append(f"s{i}", NO_STREAM, [_event()]) for i in range(CALLERS))
        )
        before = storage.transactions

        async def late(i: int) -> int:
            await asyncio.sleep(0.02 * i)  # arrivals spread over 140 ms, far beyond one round trip
            result = await storage.append(f"s{i}", first[i].current_revision, [_event()])
            return result.current_revision

        assert await asyncio.gather(*(late(i) for i in range(CALLERS))) == [1] * CALLERS
        assert storage.transactions - before == 1  # one per append without the wait
        events, head = await storage.read_all(1, limit=100)
        assert head == 2 * CALLERS and [e.position for e in events] == list(range(1, 2 * CALLERS + 1))
    finally:
        await storage.close()


async def test_a_lone_caller_after_a_burst_waits_boundedly(postgres_url: str) -> None:
    storage = PostgresEventStorage(postgres_url, group_wait=0.3)
    await storage.open()
    try:
        await asyncio.gather(*(storage.append(f"b{i}", NO_STREAM, [_event()]) for i in range(CALLERS)))
        # The target is 8 now: a lone append waits for company, at most the current wait (half of
        # group_wait to begin with), then commits alone; the wait that ran out halves the next one.
        began = time.monotonic()
        await storage.append("alone", NO_STREAM, [_event()])
        assert 0.1 <= time.monotonic() - began < 10
        result = await storage.append("alone", 0, [_event()])
        assert result.current_revision == 1
    finally:
        await storage.close()
