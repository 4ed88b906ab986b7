"""EventStore on PostgreSQL, for control planes of more than one node (psycopg 3, async).

Appends serialise on one row lock (the log head), so global positions are
handed out in commit order: a subscriber that has read up to position N can
never later find a smaller position committed behind it. Per-stream expected
versions are checked under the same lock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from rpcmesh.controlplane.eventstore.model import (
    AppendResult,
    NewEvent,
    StoredEvent,
    WrongExpectedVersion,
    expected_matches,
    fresh_events,
    prefix_upper_bound,
)
from rpcmesh.controlplane.eventstore.storage import AppendSignal

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


class PostgresEventStorage:
    """EventStorage in PostgreSQL tables ``es_events`` and ``es_head``."""

    def __init__(self, url: str, *, max_connections: int = 10) -> None:
        self.url = url
        self._pool = AsyncConnectionPool(url, min_size=1, max_size=max_connections, open=False)
        self._signal = AppendSignal()

    async def open(self) -> None:
        """Open the pool and create the schema (serialised across nodes by an advisory lock)."""
        await self._pool.open(wait=True)
        async with self._pool.connection() as conn, conn.transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    await conn.execute(statement)
        self._signal.advance(await self.head())

    async def close(self) -> None:
        """Close the pool."""
        await self._pool.close()

    async def append(self, stream: str, expected: int, events: Sequence[NewEvent]) -> AppendResult:
        """Append in one transaction under the log-head row lock."""
        async with self._pool.connection() as conn, conn.transaction():
            result = await self._append(conn, stream, expected, events)
        self._signal.advance(result.position)
        return result

    @staticmethod
    async def _append(
        conn: AsyncConnection[Any], stream: str, expected: int, events: Sequence[NewEvent]
    ) -> AppendResult:
        cur = await conn.execute("SELECT position FROM es_head WHERE id = 1 FOR UPDATE")
        head_row = await cur.fetchone()
        assert head_row is not None
        head = int(head_row[0])
        cur = await conn.execute("SELECT MAX(revision) FROM es_events WHERE stream = %s", (stream,))
        row = await cur.fetchone()
        current = -1 if row is None or row[0] is None else int(row[0])
        stored: set[str] = set()
        if events:
            cur = await conn.execute(
                "SELECT event_id FROM es_events WHERE stream = %s AND event_id = ANY(%s)",
                (stream, [e.event_id for e in events]),
            )
            stored = {r[0] for r in await cur.fetchall()}
        fresh = fresh_events(events, stored)
        if events and not fresh:
            return AppendResult(current_revision=current, position=head, appended=0)
        if not expected_matches(expected, current):
            raise WrongExpectedVersion(stream, expected, current)
        if not fresh:
            return AppendResult(current_revision=current, position=head, appended=0)
        now = time.time()
        rows = [
            (
                head + offset,
                stream,
                current + offset,
                event.event_id,
                event.event_type,
                event.data,
                event.content_type,
                Jsonb(dict(event.metadata)),
                now,
            )
            for offset, event in enumerate(fresh, start=1)
        ]
        async with conn.cursor() as cursor:
            await cursor.executemany(
                f"INSERT INTO es_events ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [(r[1], r[3], r[4], r[2], r[0], r[5], r[6], r[7], r[8]) for r in rows],
            )
        new_head = head + len(fresh)
        await conn.execute("UPDATE es_head SET position = %s WHERE id = 1", (new_head,))
        return AppendResult(current_revision=current + len(fresh), position=new_head, appended=len(fresh))

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
