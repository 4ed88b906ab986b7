"""The shared log's compaction point never moves back, and a hole in the log is never served as history.

Two real PostgresRegistryStore objects share one fresh database with a small
retained window (64 events, compaction every 8). Each node decides whether to
compact when it commits a write; a node learns of the other's compaction only
when its tail reads the log, which can be late (a stalled connection, a busy
pool, a retry backoff). Here node A's tail is held while node B compacts, so
A, still believing the older point, compacts a little further; B, whose tail is
held from its own compaction on, then commits its next write believing its own
(now older) point. Before the fix each node
wrote the point it believed, so B set ``compact_revision`` back below events A
had deleted, and a Watch resuming from between the two points was served the
retained events after the hole, silently missing the deleted ones. Now the
point is read under the revision lock and only moves forward, and
``events_after`` refuses (OUT_OF_RANGE) a log whose first event is not the
next revision.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from functools import partial

import psycopg
import pytest
from google.protobuf import timestamp_pb2
from rpcmesh.v1 import registry_pb2

from rpcmesh.controlplane.registry import transitions
from rpcmesh.controlplane.registry.model import Event, new_id, new_token
from rpcmesh.controlplane.registry.postgres_store import PostgresRegistryStore
from rpcmesh.errors import OutOfRangeError

pytestmark = [pytest.mark.backend]

SEED = 6047
TRIALS = 3
RETAIN = 64
STEP = RETAIN // 8  # the store compacts once RETAIN + STEP events are retained


class _LateTail(PostgresRegistryStore):
    """The real store, whose tail (reading the shared log) waits while ``tail_open`` is clear.

    A stand-in for a node that reads the log late; everything else (writes, compaction) is the store's own.
    """

    def __init__(self, url: str) -> None:
        super().__init__(url, retain_events=RETAIN, poll_interval=0.05)
        self.tail_open = asyncio.Event()
        self.tail_open.set()

    async def _catch_up(self) -> None:
        await self.tail_open.wait()
        await super()._catch_up()


async def _meta(url: str) -> tuple[int, int]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (await conn.execute("SELECT revision, compact_revision FROM registry_meta")).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def _oldest_event(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (await conn.execute("SELECT min(revision) FROM registry_events")).fetchone()
    assert row is not None and row[0] is not None
    return int(row[0])


class _Writer:
    """Registers churn instances through one store, checking the compaction point after each write."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.count = 0
        self.highest_compact = 0

    async def write(self, store: PostgresRegistryStore, where: str) -> int:
        self.count += 1
        stamp = timestamp_pb2.Timestamp()
        stamp.GetCurrentTime()
        fresh = transitions.Fresh(lease_id=new_id(), lease_token=new_token(), now=stamp)
        declared = registry_pb2.Instance(
            service="order", instance_id=f"i{self.count}", address=f"127.0.0.1:{1000 + self.count}"
        )
        decide = partial(transitions.register, declared=declared, ttl_ms=600_000, lease_token="", fresh=fresh)
        committed = await store.mutate("order", declared.instance_id, decide)
        revision, compact = await _meta(self.url)
        assert revision == committed.revision, where
        assert compact >= self.highest_compact, (
            f"compact_revision moved back from {self.highest_compact} to {compact} at revision {revision} "
            f"({where})"
        )
        self.highest_compact = compact
        return revision


async def _settled(store: PostgresRegistryStore, url: str) -> None:
    """Wait until the store's tail has read the log up to the database's revision and compaction point."""
    for _ in range(400):
        _, compact = await _meta(url)
        if store.compact_revision == compact:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the store did not read compact_revision {compact}")


@pytest.fixture
async def stores(postgres_url: str) -> AsyncIterator[tuple[_LateTail, _LateTail]]:
    a, b = _LateTail(postgres_url), _LateTail(postgres_url)
    events: list[Event] = []
    try:
        await a.open(events.extend)
        await b.open(events.extend)
        yield a, b
    finally:
        a.tail_open.set()
        b.tail_open.set()
        await a.close()
        await b.close()


async def test_compaction_point_never_moves_back_across_nodes(
    stores: tuple[_LateTail, _LateTail], postgres_url: str
) -> None:
    a, b = stores
    writer = _Writer(postgres_url)
    for trial in range(TRIALS):
        rng = random.Random(SEED + trial)
        # Both nodes agree on the point; the next compaction is due at revision compact + RETAIN + STEP.
        revision, compact = await _meta(postgres_url)
        while revision < compact + RETAIN + STEP - 1:
            revision = await writer.write(rng.choice((a, b)), f"seed={SEED + trial} filling")
        await _settled(a, postgres_url)
        await _settled(b, postgres_url)
        believed_by_a = a.compact_revision
        a.tail_open.clear()  # A reads the log late from here on
        revision = await writer.write(b, f"seed={SEED + trial} B compacts")
        _, compact_b = await _meta(postgres_url)
        assert compact_b > believed_by_a
        await _settled(b, postgres_url)
        b.tail_open.clear()  # and B too, from its own compaction on
        # A, still believing the older point, compacts (at most STEP - 2 further, so that B's next
        # write does not compact again) ...
        ahead = rng.randint(1, STEP - 2)
        for _ in range(ahead):
            revision = await writer.write(a, f"seed={SEED + trial} A writes ahead={ahead}")
        # ... then B writes, believing its own point: the point must not move back below A's.
        where = f"seed={SEED + trial} ahead={ahead} B compacted to {compact_b}"
        revision = await writer.write(b, where)
        oldest = await _oldest_event(postgres_url)
        _, compact = await _meta(postgres_url)
        assert oldest == compact + 1, (
            f"events up to {oldest - 1} are gone, the point says {compact} ({where})"
        )
        # A Watch resuming anywhere around the point gets every event after it, or OUT_OF_RANGE.
        for after in range(compact_b - 1, compact + 2):
            try:
                served = [event.revision for event in await b.events_after(after, 1000)]
            except OutOfRangeError:
                assert after < compact, f"after_revision={after} was refused ({where})"
                continue
            assert served == list(range(after + 1, revision + 1)), f"after_revision={after} ({where})"
        a.tail_open.set()
        b.tail_open.set()
        await _settled(a, postgres_url)
        await _settled(b, postgres_url)


async def test_events_after_refuses_a_hole_in_the_log(postgres_url: str) -> None:
    """A log whose point was set back (by an earlier build) has a hole: OUT_OF_RANGE, not the rest."""
    store = PostgresRegistryStore(postgres_url, retain_events=RETAIN, poll_interval=0.05)
    events: list[Event] = []
    await store.open(events.extend)
    try:
        writer = _Writer(postgres_url)
        for _ in range(12):
            await writer.write(store, "filling")
        # What an earlier build could leave: events up to 6 compacted away, the point set back to 2.
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
            await conn.execute("DELETE FROM registry_events WHERE revision <= 6")
            await conn.execute("UPDATE registry_meta SET compact_revision = 2")
        assert [event.revision for event in await store.events_after(6, 100)] == list(range(7, 13))
        for after in (1, 2, 3, 5):
            with pytest.raises(OutOfRangeError):
                await store.events_after(after, 100)
    finally:
        await store.close()
