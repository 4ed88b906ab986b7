"""EventStore on PostgreSQL, for control planes of more than one node (psycopg 3, async).

Appends serialise on one row lock (the log head), so global positions are
handed out in commit order: a subscriber that has read up to position N can
never later find a smaller position committed behind it. Per-stream expected
versions stay exact through the (stream, revision) key: rows judged on a
stale revision cannot be stored.

Group commit: each node queues its appends while a commit is in flight and
commits the queue together (judged in memory by group.py: a failed
expected-version check fails only its own append). Before it commits, the
writer waits up to ``group_wait`` (5 ms; less when waits keep running out)
for as many appends as its recent groups had (``GroupPacer``): under
concurrent load one round trip, statement and commit then serve all the
concurrent callers instead of one or two each (the CPU and the process
wake-ups of those, in the node and in PostgreSQL, bound the append rate). The judging happens before
the lock: one statement then bumps the head and inserts the rows, so the lock
is held for that statement and its commit only, never across a round trip to
Python; the unique keys catch a group judged on stale revisions, which is then
judged again under the lock. A transaction that fails as a whole (rolled back)
is retried append by append, so one bad member fails alone; a lost connection
fails its group (the outcome is unknown, so nothing is replayed).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import psycopg.errors
from psycopg import AsyncConnection, AsyncCursor, AsyncPipeline
from psycopg_pool import AsyncConnectionPool

from rpcmesh.controlplane.eventstore.group import (
    GroupPacer,
    PendingAppend,
    QueuedAppend,
    Row,
    fail,
    group_size,
    plan_group,
    settle,
)
from rpcmesh.controlplane.eventstore.model import (
    AppendResult,
    NewEvent,
    StoredEvent,
    compact_json,
    prefix_upper_bound,
)
from rpcmesh.controlplane.eventstore.storage import AppendSignal
from rpcmesh.tasks import start_supervised, stop_tasks

SCHEMA = """
SELECT pg_advisory_xact_lock(7406221);
CREATE TABLE IF NOT EXISTS es_events (
    position BIGINT PRIMARY KEY,
    stream TEXT COLLATE "C" NOT NULL,
    revision BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT COLLATE "C" NOT NULL,
    data BYTEA NOT NULL,
    content_type TEXT NOT NULL,
    metadata JSONB NOT NULL,
    recorded_at DOUBLE PRECISION NOT NULL,
    UNIQUE (stream, revision),
    UNIQUE (stream, event_id)
);
CREATE INDEX IF NOT EXISTS es_events_by_type ON es_events (event_type, position);
CREATE INDEX IF NOT EXISTS es_events_by_stream_position ON es_events (stream, position);
CREATE TABLE IF NOT EXISTS es_head (id INT PRIMARY KEY, position BIGINT NOT NULL);
INSERT INTO es_head VALUES (1, 0) ON CONFLICT DO NOTHING;
"""

_COLUMNS = "stream, event_id, event_type, revision, position, data, content_type, metadata, recorded_at"
# Other nodes append too; subscribers re-read at least this often.
POLL_SECONDS = 0.5
# Streams whose revision a node remembers (for appends judged without a look-up).
_REVISION_CACHE = 10_000


def _row_to_event(row: Sequence[Any]) -> StoredEvent:
    metadata = row[7] if isinstance(row[7], dict) else json.loads(row[7])
    return StoredEvent(
        stream=row[0],
        event_id=row[1],
        event_type=row[2],
        revision=int(row[3]),
        position=int(row[4]),
        data=bytes(row[5]),
        content_type=row[6],
        metadata=metadata,
        recorded_at=float(row[8]),
    )


# One statement for a whole group's rows (arrays in, one row per element out).
_ROWS_FROM = (
    "d, c, m::jsonb, %s FROM unnest("
    "%s::text[], %s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bytea[], %s::text[], %s::text[]"
    ") AS u(s, i, t, r, p, d, c, m)"
)
_INSERT_ROWS = f"INSERT INTO es_events ({_COLUMNS}) SELECT s, i, t, r, p, {_ROWS_FROM}"
# The same, with the planned positions moved onto the head as bumped by this transaction:
# position - (planned head + count) + current head.
# One statement, committed on its own: the head bump takes the lock (and, waiting, re-reads
# the newest head), the rows take positions from it; the unique keys check the rows against
# everything committed, whatever the statement's snapshot.
_BUMP_AND_INSERT = (
    "WITH bump AS (UPDATE es_head SET position = position + %s WHERE id = 1 RETURNING position), "
    f"rows AS (INSERT INTO es_events ({_COLUMNS}) SELECT s, i, t, r, p - %s + bump.position, "
    f"{_ROWS_FROM} CROSS JOIN bump) "
    "SELECT position FROM bump"
)


def _columns_of(rows: Sequence[Row]) -> tuple[Any, ...]:
    """The parameters of _INSERT_ROWS: the time, then one array per column."""
    return (
        time.time(),
        [row[1] for row in rows],
        [row[3].event_id for row in rows],
        [row[3].event_type for row in rows],
        [row[2] for row in rows],
        [row[0] for row in rows],
        [row[3].data for row in rows],
        [row[3].content_type for row in rows],
        [compact_json(dict(row[3].metadata)) if row[3].metadata else "{}" for row in rows],
    )


def _time_out(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class PostgresEventStorage:
    """EventStorage in PostgreSQL tables ``es_events`` and ``es_head``."""

    def __init__(self, url: str, *, max_connections: int = 10, group_wait: float = 0.005) -> None:
        self.url = url
        self._pool = AsyncConnectionPool(url, min_size=1, max_size=max_connections, open=False)
        self._signal = AppendSignal()
        self._queue: list[QueuedAppend] = []
        self._wake = asyncio.Event()
        self._pacer = GroupPacer(max_wait=group_wait)
        """How long and for how many appends the writer waits before a commit (``group_wait`` at most)."""
        self._gathering: asyncio.Future[None] | None = None
        """Resolved by the append that fills the queue to the pacer's target (or by a timer)."""
        self._writer_task: asyncio.Task[None] | None = None
        self._closed = False
        self.transactions = 0
        """Append transactions committed by this node (each is one group commit)."""
        self._write_conn: AsyncConnection[Any] | None = None
        """The writer's own connection (autocommit), outside the pool."""
        self._revisions: dict[str, int] = {}
        """Stream revisions this node last wrote or read, oldest first (see _from_cache)."""
        self.relocked = 0
        """Groups judged again under the lock after a concurrent writer beat their optimistic commit."""

    async def open(self) -> None:
        """Open the pool and create the schema (serialised across nodes by an advisory lock)."""
        await self._pool.open(wait=True)
        async with self._pool.connection() as conn, conn.transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    await conn.execute(statement)
        self._signal.advance(await self.head())
        self._writer_task = start_supervised(self._write_loop, name="eventstore-postgres-writer")

    async def close(self) -> None:
        """Stop the writer, fail queued appends, close the pool."""
        self._closed = True
        if self._writer_task is not None:
            await stop_tasks([self._writer_task])
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(RuntimeError("event store closed"))
        self._queue.clear()
        if self._write_conn is not None:
            await self._write_conn.close()
        await self._pool.close()

    async def append(self, stream: str, expected: int, events: Sequence[NewEvent]) -> AppendResult:
        """Queue the append for this node's next group commit and wait for its outcome."""
        if self._closed:
            raise RuntimeError("event store closed")
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._queue.append(QueuedAppend(PendingAppend(stream, expected, events), future))
        self._wake.set()
        gathering = self._gathering
        if gathering is not None and not gathering.done() and len(self._queue) >= self._pacer.target:
            gathering.set_result(None)
        return await future

    async def _gather(self) -> None:
        """Wait (briefly) until the queue holds a group as large as the recent ones (see GroupPacer)."""
        if len(self._queue) >= self._pacer.target:
            return
        loop = asyncio.get_running_loop()
        gathering = self._gathering = loop.create_future()
        timer = loop.call_later(self._pacer.wait, _time_out, gathering)
        before = len(self._queue)
        try:
            await gathering
            self._pacer.waited(len(self._queue) > before)
        finally:
            timer.cancel()
            self._gathering = None

    async def _write_loop(self) -> None:
        # Supervised: a restarted run picks up what an earlier one left queued.
        if self._queue:
            self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._gather()
                take = group_size([len(item.pending.events) for item in self._queue])
                self._pacer.record(take)
                group, self._queue = self._queue[:take], self._queue[take:]
                try:
                    await self._commit_taken(group)
                except BaseException as exc:  # a bug, or the store closing: nobody is left waiting
                    fail(group, exc)
                    raise

    async def _commit_taken(self, group: list[QueuedAppend]) -> None:
        try:
            outcomes, head = await self._commit_group([item.pending for item in group])
        except psycopg.OperationalError as exc:  # outcome unknown (connection): no replay
            fail(group, exc)
            return
        except Exception:  # the transaction failed and rolled back: retry each append alone
            await self._commit_alone(group)
            return
        self._settle(group, outcomes, head)

    async def _commit_alone(self, group: list[QueuedAppend]) -> None:
        for item in group:
            try:
                outcomes, head = await self._commit_group([item.pending])
            except Exception as exc:
                if not item.future.done():
                    item.future.set_exception(exc)
                continue
            self._settle([item], outcomes, head)

    def _settle(self, group: list[QueuedAppend], outcomes: list[AppendResult | Exception], head: int) -> None:
        self._signal.advance(head)
        settle(group, outcomes)

    async def _commit_group(self, group: list[PendingAppend]) -> tuple[list[AppendResult | Exception], int]:
        """Commit a group: optimistically (the lock held only on the server), else under the lock.

        Optimistic: judge the group from the stream revisions this node remembers (appends
        of server-assigned ids) or from a lock-free look-up, then one autocommit statement
        bumps the head (taking the lock) and inserts the rows at positions computed from it.
        If another writer got to one of the streams or ids in between, a unique key
        (stream, revision) or (stream, event_id) refuses the rows, nothing is stored and the
        group is judged again in a transaction that takes the lock first.
        """
        conn = self._write_conn
        if conn is None or conn.closed:
            conn = self._write_conn = await AsyncConnection.connect(self.url, autocommit=True)
        try:
            outcomes, head = await self._append_optimistic(conn, group)
        except psycopg.errors.UniqueViolation:
            self.relocked += 1
            for append in group:
                self._revisions.pop(append.stream, None)
            async with conn.pipeline() as pipeline, conn.transaction():
                outcomes, head, rows = await self._append_locked(conn, pipeline, group)
            self._remember_rows(rows)  # committed: only facts are remembered
        except BaseException:
            if conn.broken:
                await conn.close()
            raise
        self.transactions += 1
        return outcomes, head

    @staticmethod
    async def _lookups(
        conn: AsyncConnection[Any], group: list[PendingAppend]
    ) -> tuple[AsyncCursor[Any], AsyncCursor[Any] | None]:
        streams = sorted({append.stream for append in group})
        currents_cur = await conn.execute(
            "SELECT stream, MAX(revision) FROM es_events WHERE stream = ANY(%s) GROUP BY stream", (streams,)
        )
        keys = [(a.stream, e.event_id) for a in group for e in a.events if not e.id_assigned]
        key_streams = [key[0] for key in keys]
        key_ids = [key[1] for key in keys]
        if not key_ids:
            return currents_cur, None
        stored_cur = await conn.execute(
            "SELECT e.stream, e.event_id, e.revision, e.position FROM es_events e "
            "JOIN unnest(%s::text[], %s::text[]) AS k(stream, event_id) "
            "ON e.stream = k.stream AND e.event_id = k.event_id",
            (key_streams, key_ids),
        )
        return currents_cur, stored_cur

    @staticmethod
    async def _read_lookups(
        currents_cur: AsyncCursor[Any], stored_cur: AsyncCursor[Any] | None
    ) -> tuple[dict[str, int], dict[tuple[str, str], tuple[int, int]]]:
        currents = {row[0]: int(row[1]) for row in await currents_cur.fetchall()}
        stored: dict[tuple[str, str], tuple[int, int]] = {}
        if stored_cur is not None:
            stored = {(r[0], r[1]): (int(r[2]), int(r[3])) for r in await stored_cur.fetchall()}
        return currents, stored

    def _from_cache(self, group: list[PendingAppend]) -> dict[str, int] | None:
        """The group's stream revisions as this node last wrote or read them, if it can be judged so.

        Only for groups of non-empty appends with server-assigned ids (nothing to look up
        for idempotence) on streams this node knows. A revision can only have grown since:
        a success judged from it is checked by the (stream, revision) key; a failure is
        not trusted (the caller then looks the streams up).
        """
        currents: dict[str, int] = {}
        for append in group:
            revision = self._revisions.get(append.stream)
            if revision is None or not append.events or not all(e.id_assigned for e in append.events):
                return None
            currents[append.stream] = revision
        return currents

    def _remember(self, revisions: Mapping[str, int]) -> None:
        for stream, revision in revisions.items():
            known = self._revisions.pop(stream, -1)
            self._revisions[stream] = max(known, revision)
        while len(self._revisions) > _REVISION_CACHE:
            del self._revisions[next(iter(self._revisions))]

    def _remember_rows(self, rows: Sequence[Row]) -> None:
        self._remember({stream: revision for _, stream, revision, _ in rows})

    async def _append_optimistic(
        self, conn: AsyncConnection[Any], group: list[PendingAppend]
    ) -> tuple[list[AppendResult | Exception], int]:
        cached = self._from_cache(group)
        plan = None if cached is None else plan_group(group, 0, cached, {})
        seen_head = 0
        if plan is None or any(isinstance(outcome, Exception) for outcome in plan.outcomes):
            async with conn.pipeline() as pipeline:
                currents_cur, stored_cur = await self._lookups(conn, group)
                # Read last: every stored position seen above is at most this head.
                head_cur = await conn.execute("SELECT position FROM es_head WHERE id = 1")
                await pipeline.sync()
                currents, stored = await self._read_lookups(currents_cur, stored_cur)
                head_row = await head_cur.fetchone()
            assert head_row is not None
            seen_head = int(head_row[0])
            self._remember(currents)
            plan = plan_group(group, seen_head, currents, stored)
            if not plan.rows:
                return plan.outcomes, seen_head
        count = len(plan.rows)
        cur = await conn.execute(_BUMP_AND_INSERT, (count, count + seen_head, *_columns_of(plan.rows)))
        bumped = await cur.fetchone()
        assert bumped is not None
        new_head = int(bumped[0])
        self._remember_rows(plan.rows)
        shift = new_head - count - seen_head
        outcomes: list[AppendResult | Exception] = [
            replace(outcome, position=outcome.position + shift)
            if isinstance(outcome, AppendResult) and outcome.position > seen_head
            else outcome
            for outcome in plan.outcomes
        ]
        return outcomes, new_head

    async def _append_locked(
        self, conn: AsyncConnection[Any], pipeline: AsyncPipeline, group: list[PendingAppend]
    ) -> tuple[list[AppendResult | Exception], int, list[Row]]:
        head_cur = await conn.execute("SELECT position FROM es_head WHERE id = 1 FOR UPDATE")
        # READ COMMITTED: the statements after the lock start once it is granted, so
        # they see every append committed by earlier holders of the lock.
        currents_cur, stored_cur = await self._lookups(conn, group)
        await pipeline.sync()
        head_row = await head_cur.fetchone()
        assert head_row is not None
        currents, stored = await self._read_lookups(currents_cur, stored_cur)
        plan = plan_group(group, int(head_row[0]), currents, stored)
        if plan.rows:
            await conn.execute(_INSERT_ROWS, _columns_of(plan.rows))
            await conn.execute("UPDATE es_head SET position = %s WHERE id = 1", (plan.head,))
        return plan.outcomes, plan.head, plan.rows

    async def read_stream(
        self, stream: str, from_revision: int, *, backwards: bool, limit: int
    ) -> tuple[list[StoredEvent], int]:
        """Read one stream's page and its current revision, in one snapshot."""
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur = await conn.execute("SELECT MAX(revision) FROM es_events WHERE stream = %s", (stream,))
            row = await cur.fetchone()
            current = -1 if row is None or row[0] is None else int(row[0])
            if backwards:
                start = current if from_revision < 0 else from_revision
                query = (
                    f"SELECT {_COLUMNS} FROM es_events WHERE stream = %s AND revision <= %s "
                    "ORDER BY revision DESC LIMIT %s"
                )
            else:
                start = from_revision
                query = (
                    f"SELECT {_COLUMNS} FROM es_events WHERE stream = %s AND revision >= %s "
                    "ORDER BY revision LIMIT %s"
                )
            cur = await conn.execute(query, (stream, start, limit))
            events = [_row_to_event(r) for r in await cur.fetchall()]
        return events, current

    async def read_all(
        self,
        from_position: int,
        *,
        limit: int,
        event_types: Sequence[str] = (),
        stream_prefixes: Sequence[str] = (),
    ) -> tuple[list[StoredEvent], int]:
        """Read the global log with filters; the type and stream indexes serve them."""
        where = ["position >= %s"]
        params: list[Any] = [from_position]
        if event_types:
            where.append("event_type = ANY(%s)")
            params.append(list(event_types))
        if stream_prefixes:
            ranges = []
            for prefix in stream_prefixes:
                upper = prefix_upper_bound(prefix)
                if upper is None:
                    ranges.append("stream >= %s")
                    params.append(prefix)
                else:
                    ranges.append("(stream >= %s AND stream < %s)")
                    params.extend((prefix, upper))
            where.append(f"({' OR '.join(ranges)})")
        params.append(limit)
        query = f"SELECT {_COLUMNS} FROM es_events WHERE {' AND '.join(where)} ORDER BY position LIMIT %s"
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur = await conn.execute("SELECT position FROM es_head WHERE id = 1")
            row = await cur.fetchone()
            head = int(row[0]) if row else 0
            cur = await conn.execute(query, params)
            events = [_row_to_event(r) for r in await cur.fetchall()]
        return events, head

    async def head(self) -> int:
        """The newest global position."""
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT position FROM es_head WHERE id = 1")
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    @property
    def local_head(self) -> int:
        """The newest position this process appended or saw at open (no query)."""
        return self._signal.head

    async def notify(self, channel: str, payload: str = "") -> None:
        """Send a PostgreSQL NOTIFY on ``channel`` (for other nodes' LISTENing connections)."""
        async with self._pool.connection() as conn:
            await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    async def wait_for_append(self, after_position: int, wait_seconds: float) -> None:
        """Wake on local appends; poll for other nodes' appends."""
        await self._signal.wait(after_position, min(wait_seconds, POLL_SECONDS))
