"""EventStore on embedded SQLite (WAL, synchronous=FULL) with group commit.

One writer thread owns the write connection. Appends queue up while a commit
is in flight and are then committed together in one transaction: the group is judged in
memory under the write lock (group.py), so one failed expected-version check
fails only its own append, and one fsync serves many appends. Should the
transaction itself fail, each append is retried alone so that a bad member
fails by itself. Reads use a second connection on
their own thread; WAL lets them run beside the writer.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from rpcmesh.controlplane.eventstore.group import (
    PendingAppend,
    QueuedAppend,
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

_T = TypeVar("_T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    revision INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    data BLOB NOT NULL,
    content_type TEXT NOT NULL,
    metadata TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    UNIQUE (stream, revision),
    UNIQUE (stream, event_id)
);
CREATE INDEX IF NOT EXISTS events_by_type ON events (event_type, position);
CREATE INDEX IF NOT EXISTS events_by_stream_position ON events (stream, position);
"""

_COLUMNS = "stream, event_id, event_type, revision, position, data, content_type, metadata, recorded_at"


def _row_to_event(row: tuple[Any, ...]) -> StoredEvent:
    return StoredEvent(
        stream=row[0],
        event_id=row[1],
        event_type=row[2],
        revision=row[3],
        position=row[4],
        data=bytes(row[5]),
        content_type=row[6],
        metadata=json.loads(row[7]),
        recorded_at=row[8],
    )


def _index_hint(event_types: Sequence[str], stream_prefixes: Sequence[str]) -> str:
    # Without a hint SQLite may walk the primary key in position order and filter
    # every row (a scan) to avoid sorting; filtered reads must use their index.
    if event_types:
        return "INDEXED BY events_by_type"
    if len(stream_prefixes) == 1:
        return "INDEXED BY events_by_stream_position"
    return ""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class SqliteEventStorage:
    """EventStorage in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eventstore-write")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eventstore-read")
        self._write_conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._queue: list[QueuedAppend] = []
        self._wake = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._signal = AppendSignal()
        self._closed = False
        self.transactions = 0
        """Write transactions committed (each is one group commit)."""

    async def _in(self, executor: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def open(self) -> None:
        """Create the file and schema, and start the writer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def setup() -> int:
            conn = _connect(self.path)
            conn.executescript(SCHEMA)
            self._write_conn = conn
            return int(conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0])

        head = await self._in(self._writer, setup)
        self._read_conn = await self._in(self._reader, _connect, self.path)
        self._signal.advance(head)
        self._writer_task = start_supervised(self._write_loop, name="eventstore-sqlite-writer")

    async def close(self) -> None:
        """Stop the writer, fail queued appends, close both connections."""
        self._closed = True
        if self._writer_task is not None:
            await stop_tasks([self._writer_task])
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(RuntimeError("event store closed"))
        self._queue.clear()
        if self._write_conn is not None:
            await self._in(self._writer, self._write_conn.close)
        if self._read_conn is not None:
            await self._in(self._reader, self._read_conn.close)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    async def append(self, stream: str, expected: int, events: Sequence[NewEvent]) -> AppendResult:
        """Queue the append for the next group commit and wait for its outcome."""
        if self._closed:
            raise RuntimeError("event store closed")
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._queue.append(QueuedAppend(PendingAppend(stream, expected, events), future))
        self._wake.set()
        return await future

    async def _write_loop(self) -> None:
        # Supervised: a restarted run picks up what an earlier one left queued.
        if self._queue:
            self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                take = group_size([len(item.pending.events) for item in self._queue])
                group, self._queue = self._queue[:take], self._queue[take:]
                try:
                    await self._commit_taken(group)
                except BaseException as exc:  # a bug, or the store closing: nobody is left waiting
                    fail(group, exc)
                    raise

    async def _commit_taken(self, group: list[QueuedAppend]) -> None:
        try:
            pending = [item.pending for item in group]
            outcomes, head = await self._in(self._writer, self._commit_group, pending)
        except Exception as exc:  # the transaction failed: retry each append alone
            if len(group) == 1:
                fail(group, exc)
                return
            await self._commit_alone(group)
            return
        self._settle(group, outcomes, head)

    async def _commit_alone(self, group: list[QueuedAppend]) -> None:
        for item in group:
            try:
                outcomes, head = await self._in(self._writer, self._commit_group, [item.pending])
            except Exception as exc:
                if not item.future.done():
                    item.future.set_exception(exc)
                continue
            self._settle([item], outcomes, head)

    def _settle(self, group: list[QueuedAppend], outcomes: list[AppendResult | Exception], head: int) -> None:
        self._signal.advance(head)
        settle(group, outcomes)

    def _commit_group(self, group: list[PendingAppend]) -> tuple[list[AppendResult | Exception], int]:
        conn = self._write_conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            head = int(conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0])
            currents: dict[str, int] = {}
            stored: dict[tuple[str, str], tuple[int, int]] = {}
            for stream in {item.stream for item in group}:
                row = conn.execute("SELECT MAX(revision) FROM events WHERE stream = ?", (stream,)).fetchone()
                if row[0] is not None:
                    currents[stream] = int(row[0])
            for item in group:
                ids = [event.event_id for event in item.events if not event.id_assigned]
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    for event_id, revision, position in conn.execute(
                        "SELECT event_id, revision, position FROM events "
                        f"WHERE stream = ? AND event_id IN ({marks})",
                        (item.stream, *chunk),
                    ):
                        stored[(item.stream, event_id)] = (int(revision), int(position))
            plan = plan_group(group, head, currents, stored)
            now = time.time()
            conn.executemany(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        position,
                        stream,
                        revision,
                        event.event_id,
                        event.event_type,
                        event.data,
                        event.content_type,
                        compact_json(dict(event.metadata)) if event.metadata else "{}",
                        now,
                    )
                    for position, stream, revision, event in plan.rows
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.transactions += 1
        return plan.outcomes, plan.head

    async def read_stream(
        self, stream: str, from_revision: int, *, backwards: bool, limit: int
    ) -> tuple[list[StoredEvent], int]:
        """Read one stream's page and its current revision."""

        def run() -> tuple[list[StoredEvent], int]:
            conn = self._read_conn
            assert conn is not None
            conn.execute("BEGIN")
            try:
                row = conn.execute("SELECT MAX(revision) FROM events WHERE stream = ?", (stream,)).fetchone()
                current = -1 if row[0] is None else int(row[0])
                if backwards:
                    start = current if from_revision < 0 else from_revision
                    query = (
                        f"SELECT {_COLUMNS} FROM events WHERE stream = ? AND revision <= ? "
                        "ORDER BY revision DESC LIMIT ?"
                    )
                else:
                    start = from_revision
                    query = (
                        f"SELECT {_COLUMNS} FROM events WHERE stream = ? AND revision >= ? "
                        "ORDER BY revision LIMIT ?"
                    )
                events = [_row_to_event(r) for r in conn.execute(query, (stream, start, limit))]
            finally:
                conn.execute("COMMIT")
            return events, current

        result: tuple[list[StoredEvent], int] = await self._in(self._reader, run)
        return result

    async def read_all(
        self,
        from_position: int,
        *,
        limit: int,
        event_types: Sequence[str] = (),
        stream_prefixes: Sequence[str] = (),
    ) -> tuple[list[StoredEvent], int]:
        """Read the global log with filters, each served by an index."""
        where = ["position >= ?"]
        params: list[Any] = [from_position]
        if event_types:
            where.append(f"event_type IN ({','.join('?' * len(event_types))})")
            params.extend(event_types)
        if stream_prefixes:
            ranges = []
            for prefix in stream_prefixes:
                upper = prefix_upper_bound(prefix)
                if upper is None:
                    ranges.append("stream >= ?")
                    params.append(prefix)
                else:
                    ranges.append("(stream >= ? AND stream < ?)")
                    params.extend((prefix, upper))
            where.append(f"({' OR '.join(ranges)})")
        query = (
            f"SELECT {_COLUMNS} FROM events {_index_hint(event_types, stream_prefixes)} "
            f"WHERE {' AND '.join(where)} ORDER BY position LIMIT ?"
        )
        params.append(limit)

        def run() -> tuple[list[StoredEvent], int]:
            conn = self._read_conn
            assert conn is not None
            conn.execute("BEGIN")
            try:
                head = int(conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0])
                events = [_row_to_event(r) for r in conn.execute(query, params)]
            finally:
                conn.execute("COMMIT")
            return events, head

        result: tuple[list[StoredEvent], int] = await self._in(self._reader, run)
        return result

    async def explain_read_all(self, event_types: Sequence[str], stream_prefixes: Sequence[str]) -> str:
        """SQLite's query plan for a filtered read (tests check that an index serves it)."""
        where = ["position >= ?"]
        params: list[Any] = [0]
        if event_types:
            where.append(f"event_type IN ({','.join('?' * len(event_types))})")
            params.extend(event_types)
        for prefix in stream_prefixes:
            where.append("(stream >= ? AND stream < ?)")
            params.extend((prefix, prefix_upper_bound(prefix)))
        query = (
            f"EXPLAIN QUERY PLAN SELECT {_COLUMNS} FROM events {_index_hint(event_types, stream_prefixes)} "
            f"WHERE {' AND '.join(where)} ORDER BY position"
        )

        def run() -> str:
            conn = self._read_conn
            assert conn is not None
            return "\n".join(str(r[-1]) for r in conn.execute(query, params))

        plan: str = await self._in(self._reader, run)
        return plan

    async def head(self) -> int:
        """The newest global position."""

        def run() -> int:
            conn = self._read_conn
            assert conn is not None
            return int(conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0])

        value: int = await self._in(self._reader, run)
        return value

    async def wait_for_append(self, after_position: int, wait_seconds: float) -> None:
        """Wait for a local append past ``after_position`` (this file has one writer: this process)."""
        await self._signal.wait(after_position, wait_seconds)
