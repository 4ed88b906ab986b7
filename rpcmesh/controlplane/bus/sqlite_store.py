"""The embedded Bus store: an SQLite log in ``data_dir/bus.db``.

WAL mode with ``synchronous=FULL``: an append returns only after its commit
reached the disk. Appends from many concurrent publishers are group-committed:
one writer thread drains every queued operation into a single transaction, so
the cost of an fsync is shared by all the messages waiting for it. Reads use a
second connection on their own thread and only look at committed sequences.

Group state (one row per group): the ack floor, the acks above it, and the
delivery count of every unfinished message delivered at least once (as
``[first, last, count]`` runs), so attempt counts survive a restart. The broker
saves it every ``FLUSH_INTERVAL`` (50 ms) while it changes, through the same
group commit. Bound: a crash loses only what changed since the last committed
save, so a message delivered in that window comes back with its count lower by
the deliveries of the window (in practice by one); counts are never inflated.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rpcmesh.controlplane.bus.store import AppendResult, GroupRecord, RetentionPolicy, TopicStats
from rpcmesh.errors import NotFoundError
from rpcmesh.tasks import stop_tasks
from rpcmesh.v1 import bus_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_DEDUP_WINDOW = 120.0
MAX_DEDUP_ENTRIES = 1_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS topics (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    max_messages INTEGER NOT NULL DEFAULT 0,
    max_bytes INTEGER NOT NULL DEFAULT 0,
    max_age REAL NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    topic_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    client_id INTEGER NOT NULL,
    publish_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (topic_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups (
    topic_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    ack_floor INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (topic_id, name)
);
"""


@dataclass
class _Topic:
    id: int
    name: str
    retention: RetentionPolicy
    first_seq: int
    last_seq: int
    committed_last_seq: int
    count: int
    bytes: int


def encode_attempts(attempts: dict[int, int]) -> list[list[int]]:
    """Delivery counts as ``[first, last, count]`` runs (in-flight sequences are mostly contiguous)."""
    runs: list[list[int]] = []
    for seq in sorted(attempts):
        count = attempts[seq]
        if runs and runs[-1][1] == seq - 1 and runs[-1][2] == count:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq, count])
    return runs


def decode_attempts(stored: object) -> dict[int, int]:
    """The inverse of :func:`encode_attempts` (also reads the older ``{seq: count}`` form)."""
    if isinstance(stored, dict):
        return {int(seq): int(count) for seq, count in stored.items()}
    attempts: dict[int, int] = {}
    for first, last, count in stored if isinstance(stored, list) else []:
        for seq in range(int(first), int(last) + 1):
            attempts[seq] = int(count)
    return attempts


class SqliteBusStore:
    """The Bus log and group state in one SQLite file (see module docstring)."""

    def __init__(self, path: Path, *, dedup_window: float = DEFAULT_DEDUP_WINDOW) -> None:
        self.path = path
        self.dedup_window = dedup_window
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bus-sqlite-write")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bus-sqlite-read")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._topics: dict[str, _Topic] = {}
        self._lock = threading.Lock()
        self._dedup: dict[tuple[int, str], tuple[int, float]] = {}
        self._dedup_order: collections.deque[tuple[float, tuple[int, str]]] = collections.deque()
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}{int(time.time() * 1000):x}-"

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Open both connections, create the schema and load topics and the dedup window."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._open_writer)
        await loop.run_in_executor(self._reader, self._open_reader)
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._write_loop(), name="bus-sqlite-writer")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def _open_writer(self) -> None:
        conn = self._connect()
        conn.executescript(_SCHEMA)
        self._wconn = conn
        self._load_topics(conn)
        cutoff = time.time_ns() - int(self.dedup_window * 1e9)
        rows = conn.execute(
            "SELECT topic_id, id, seq, publish_ns FROM messages WHERE client_id = 1 AND publish_ns >= ? "
            "ORDER BY publish_ns",
            (cutoff,),
        )
        for topic_id, message_id, seq, publish_ns in rows:
            self._remember(topic_id, message_id, seq, publish_ns / 1e9 + self.dedup_window)

    def _open_reader(self) -> None:
        self._rconn = self._connect()

    def _load_topics(self, conn: sqlite3.Connection) -> None:
        topics: dict[str, _Topic] = {}
        for tid, name, max_messages, max_bytes, max_age, last_seq in conn.execute(
            "SELECT id, name, max_messages, max_bytes, max_age, last_seq FROM topics"
        ):
            first, count, total = conn.execute(
                "SELECT MIN(seq), COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE topic_id = ?", (tid,)
            ).fetchone()
            retention = RetentionPolicy(max_messages=max_messages, max_bytes=max_bytes, max_age=max_age)
            topics[name] = _Topic(
                id=tid,
                name=name,
                retention=retention,
                first_seq=first if first is not None else last_seq + 1,
                last_seq=last_seq,
                committed_last_seq=last_seq,
                count=count,
                bytes=total,
            )
        with self._lock:
            self._topics = topics

    async def close(self) -> None:
        """Finish queued writes and close the connections; later writes fail at once."""
        self._closed = True
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None
        if self._queue:
            batch, self._queue = self._queue, []
            await self._run(batch)
        loop = asyncio.get_running_loop()
        if self._wconn is not None:
            await loop.run_in_executor(self._writer, self._wconn.close)
            self._wconn = None
        if self._rconn is not None:
            await loop.run_in_executor(self._reader, self._rconn.close)
            self._rconn = None
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    # -- group commit ----------------------------------------------------------------

    async def _write(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        if self._wake is None:
            raise RuntimeError("store is not open")
        if self._closed:
            # Nothing would ever run it: fail rather than wait forever.
            raise RuntimeError(f"{self.path} is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((operation, future))
        self._wake.set()
        return await future

    async def _write_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._queue:
                continue
            batch, self._queue = self._queue, []
            await self._run(batch)

    async def _run(
        self, batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]
    ) -> None:
        loop = asyncio.get_running_loop()
        operations = [operation for operation, _ in batch]
        try:
            outcomes = await asyncio.shield(loop.run_in_executor(self._writer, self._transaction, operations))
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _transaction(self, operations: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        conn = self._wconn
        assert conn is not None
        outcomes: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for operation in operations:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, operation(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._load_topics(conn)
            raise
        with self._lock:
            for topic in self._topics.values():
                topic.committed_last_seq = topic.last_seq
        return outcomes

    # -- topics ----------------------------------------------------------------------

    def _stats(self, topic: _Topic, groups: tuple[str, ...] = ()) -> TopicStats:
        return TopicStats(
            name=topic.name,
            retention=topic.retention,
            first_sequence=topic.first_seq,
            last_sequence=topic.committed_last_seq,
            message_count=topic.count,
            groups=groups,
        )

    def _ensure_topic(
        self, conn: sqlite3.Connection, name: str, retention: RetentionPolicy
    ) -> tuple[_Topic, bool]:
        topic = self._topics.get(name)
        if topic is not None:
            return topic, False
        cursor = conn.execute(
            "INSERT INTO topics (name, max_messages, max_bytes, max_age) VALUES (?, ?, ?, ?)",
            (name, retention.max_messages, retention.max_bytes, retention.max_age),
        )
        assert cursor.lastrowid is not None
        topic = _Topic(
            id=cursor.lastrowid,
            name=name,
            retention=retention,
            first_seq=1,
            last_seq=0,
            committed_last_seq=0,
            count=0,
            bytes=0,
        )
        with self._lock:
            self._topics[name] = topic
        return topic, True

    async def create_topic(self, name: str, retention: RetentionPolicy) -> tuple[TopicStats, bool]:
        """Create a topic; returns it and whether it was new."""

        def operation(conn: sqlite3.Connection) -> tuple[TopicStats, bool]:
            topic, created = self._ensure_topic(conn, name, retention)
            return self._stats(topic), created

        return await self._write(operation)

    async def get_topic(self, name: str) -> TopicStats | None:
        """A topic with its groups, or None."""
        topic = self._topics.get(name)
        if topic is None:
            return None
        groups = await self._read(
            lambda conn: tuple(
                row[0]
                for row in conn.execute(
                    "SELECT name FROM groups WHERE topic_id = ? ORDER BY name", (topic.id,)
                )
            )
        )
        return self._stats(topic, groups)

    async def list_topics(self, after: str, limit: int) -> list[TopicStats]:
        """Topics sorted by name, after ``after``."""
        with self._lock:
            names = sorted(name for name in self._topics if name > after)[:limit]
        result = []
        for name in names:
            stats = await self.get_topic(name)
            if stats is not None:
                result.append(stats)
        return result

    async def delete_topic(self, name: str) -> bool:
        """Delete a topic with its messages and groups."""

        def operation(conn: sqlite3.Connection) -> bool:
            topic = self._topics.get(name)
            if topic is None:
                return False
            conn.execute("DELETE FROM messages WHERE topic_id = ?", (topic.id,))
            conn.execute("DELETE FROM groups WHERE topic_id = ?", (topic.id,))
            conn.execute("DELETE FROM topics WHERE id = ?", (topic.id,))
            with self._lock:
                del self._topics[name]
            for key in [key for key in self._dedup if key[0] == topic.id]:
                del self._dedup[key]
            return True

        return await self._write(operation)

    def last_sequence(self, topic: str) -> int:
        """The newest committed sequence of ``topic`` (0 when unknown)."""
        stats = self._topics.get(topic)
        return stats.committed_last_seq if stats is not None else 0

    # -- messages --------------------------------------------------------------------

    def _remember(self, topic_id: int, message_id: str, seq: int, expires: float) -> None:
        key = (topic_id, message_id)
        self._dedup[key] = (seq, expires)
        self._dedup_order.append((expires, key))

    def _forget_expired(self, now: float) -> None:
        order = self._dedup_order
        while order and (order[0][0] <= now or len(self._dedup) > MAX_DEDUP_ENTRIES):
            expires, key = order.popleft()
            current = self._dedup.get(key)
            if current is not None and current[1] == expires:
                del self._dedup[key]

    async def append(
        self, topic: str, messages: Sequence[bus_pb2.BusMessage], *, dedup: bool = True
    ) -> list[AppendResult]:
        """Store messages durably (group-committed), creating the topic if needed."""

        def operation(conn: sqlite3.Connection) -> list[AppendResult]:
            return self._append(conn, topic, messages, dedup)

        return await self._write(operation)

    def _append(
        self, conn: sqlite3.Connection, name: str, messages: Sequence[bus_pb2.BusMessage], dedup: bool
    ) -> list[AppendResult]:
        topic, _ = self._ensure_topic(conn, name, RetentionPolicy())
        now = time.time()
        now_ns = time.time_ns()
        self._forget_expired(now)
        expires = now + self.dedup_window
        results: list[AppendResult] = []
        rows: list[tuple[int, int, str, int, int, int, bytes]] = []
        seq = topic.last_seq
        added_bytes = 0
        for message in messages:
            client_id = bool(message.id)
            if client_id and dedup:
                seen = self._dedup.get((topic.id, message.id))
                if seen is not None and seen[1] > now:
                    results.append(AppendResult(id=message.id, sequence=seen[0], duplicate=True))
                    continue
            elif not client_id:
                message.id = f"{self._id_prefix}{next(self._ids):x}"
            seq += 1
            message.topic = name
            message.sequence = seq
            message.publish_time.FromNanoseconds(now_ns)
            body = message.SerializeToString()
            rows.append((topic.id, seq, message.id, int(client_id), now_ns, len(body), body))
            added_bytes += len(body)
            if client_id:
                self._remember(topic.id, message.id, seq, expires)
            results.append(AppendResult(id=message.id, sequence=seq))
        if rows:
            conn.executemany(
                "INSERT INTO messages (topic_id, seq, id, client_id, publish_ns, size, body) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            conn.execute("UPDATE topics SET last_seq = ? WHERE id = ?", (seq, topic.id))
            if topic.count == 0:
                topic.first_seq = rows[0][1]
            topic.last_seq = seq
            topic.count += len(rows)
            topic.bytes += added_bytes
            self._trim(conn, topic)
        return results

    def _trim(self, conn: sqlite3.Connection, topic: _Topic) -> None:
        retention = topic.retention
        cut = topic.first_seq - 1
        if retention.max_messages and topic.count > retention.max_messages:
            cut = max(cut, topic.last_seq - retention.max_messages)
        if retention.max_bytes and topic.bytes > retention.max_bytes:
            excess = topic.bytes - retention.max_bytes
            freed = 0
            for seq, size in conn.execute(
                "SELECT seq, size FROM messages WHERE topic_id = ? ORDER BY seq", (topic.id,)
            ):
                if freed >= excess:
                    break
                freed += size
                cut = max(cut, seq)
        if cut >= topic.first_seq:
            self._delete_through(conn, topic, cut)

    def _delete_through(self, conn: sqlite3.Connection, topic: _Topic, cut: int) -> None:
        count, total = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE topic_id = ? AND seq <= ?",
            (topic.id, cut),
        ).fetchone()
        conn.execute("DELETE FROM messages WHERE topic_id = ? AND seq <= ?", (topic.id, cut))
        topic.count -= count
        topic.bytes -= total
        following = conn.execute(
            "SELECT MIN(seq) FROM messages WHERE topic_id = ? AND seq > ?", (topic.id, cut)
        ).fetchone()[0]
        topic.first_seq = following if following is not None else topic.last_seq + 1

    async def read(self, topic: str, from_sequence: int, limit: int) -> tuple[list[bus_pb2.BusMessage], int]:
        """Up to ``limit`` committed messages from ``from_sequence``, and the last sequence scanned."""
        stats = self._topics.get(topic)
        if stats is None:
            return [], from_sequence - 1
        upto = stats.committed_last_seq
        if from_sequence > upto:
            return [], from_sequence - 1
        tid = stats.id

        def query(conn: sqlite3.Connection) -> list[bytes]:
            return [
                row[0]
                for row in conn.execute(
                    "SELECT body FROM messages WHERE topic_id = ? AND seq BETWEEN ? AND ? "
                    "ORDER BY seq LIMIT ?",
                    (tid, from_sequence, upto, limit),
                )
            ]

        bodies = await self._read(query)
        messages = [bus_pb2.BusMessage.FromString(body) for body in bodies]
        read_through = int(messages[-1].sequence) if len(messages) == limit else upto
        return messages, read_through

    async def sequence_at(self, topic: str, time_ns: int) -> int:
        """The first sequence published at or after ``time_ns``."""
        stats = self._topics.get(topic)
        if stats is None:
            return 1
        tid = stats.id
        found = await self._read(
            lambda conn: conn.execute(
                "SELECT MIN(seq) FROM messages WHERE topic_id = ? AND publish_ns >= ?", (tid, time_ns)
            ).fetchone()[0]
        )
        return int(found) if found is not None else stats.committed_last_seq + 1

    async def delete_messages(self, topic: str, sequences: Sequence[int]) -> int:
        """Remove single messages."""

        def operation(conn: sqlite3.Connection) -> int:
            stats = self._topics.get(topic)
            if stats is None:
                raise NotFoundError(f"topic {topic!r} does not exist")
            removed = 0
            for seq in sequences:
                row = conn.execute(
                    "DELETE FROM messages WHERE topic_id = ? AND seq = ? RETURNING size", (stats.id, seq)
                ).fetchone()
                if row is not None:
                    removed += 1
                    stats.count -= 1
                    stats.bytes -= row[0]
            following = conn.execute(
                "SELECT MIN(seq) FROM messages WHERE topic_id = ?", (stats.id,)
            ).fetchone()[0]
            stats.first_seq = following if following is not None else stats.last_seq + 1
            return removed

        return await self._write(operation)

    async def enforce_retention(self, now_ns: int) -> None:
        """Drop messages older than each topic's max_age."""
        if not any(topic.retention.max_age for topic in list(self._topics.values())):
            return

        def operation(conn: sqlite3.Connection) -> None:
            for topic in list(self._topics.values()):
                if not topic.retention.max_age or topic.count == 0:
                    continue
                cutoff = now_ns - int(topic.retention.max_age * 1e9)
                row = conn.execute(
                    "SELECT MAX(seq) FROM messages WHERE topic_id = ? AND publish_ns < ?", (topic.id, cutoff)
                ).fetchone()
                if row[0] is not None:
                    self._delete_through(conn, topic, int(row[0]))

        await self._write(operation)

    # -- groups ----------------------------------------------------------------------

    async def load_group(self, topic: str, name: str) -> GroupRecord | None:
        """A group's durable state, or None."""
        stats = self._topics.get(topic)
        if stats is None:
            return None
        tid = stats.id
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT ack_floor, state FROM groups WHERE topic_id = ? AND name = ?", (tid, name)
            ).fetchone()
        )
        if row is None:
            return None
        state = json.loads(row[1])
        return GroupRecord(
            topic=topic,
            name=name,
            ack_floor=int(row[0]),
            acked_above_floor=frozenset(int(seq) for seq in state.get("done", [])),
            attempts=decode_attempts(state.get("attempts", {})),
        )

    async def save_group(self, record: GroupRecord) -> None:
        """Create or update a group's state."""
        state = json.dumps(
            {
                "done": sorted(record.acked_above_floor),
                "attempts": encode_attempts(record.attempts),
            }
        )

        def operation(conn: sqlite3.Connection) -> None:
            topic, _ = self._ensure_topic(conn, record.topic, RetentionPolicy())
            conn.execute(
                "INSERT INTO groups (topic_id, name, ack_floor, state) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (topic_id, name) DO UPDATE "
                "SET ack_floor = excluded.ack_floor, state = excluded.state",
                (topic.id, record.name, record.ack_floor, state),
            )

        await self._write(operation)

    # -- reads -----------------------------------------------------------------------

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._rconn
        if conn is None:
            raise RuntimeError("store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._reader, query, conn)
