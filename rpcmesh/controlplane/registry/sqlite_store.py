"""The embedded Registry store: one SQLite file (WAL, synchronous=FULL) and a writer thread.

All writes go through one dedicated thread that drains its queue into a single
transaction, so concurrent registrations share one fsync and the event loop
never blocks on disk. Leases live in memory on the monotonic clock: a renewal
is not a write, and on open every lease is granted its full TTL again (as etcd
does when a new leader takes over), so a restart does not expire healthy
instances. Lease changes made by a batch (grants, revocations, leases popped as
expired) are undone when its commit fails, so the leases in memory always match
the instances in the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rpcmesh.controlplane.registry import transitions
from rpcmesh.controlplane.registry.leases import Clock, Lease, LeaseTable
from rpcmesh.controlplane.registry.model import Change, Committed, Event, StoredInstance, token_matches
from rpcmesh.controlplane.registry.store import Decide, EventSink, Loaded, ResetSink
from rpcmesh.errors import NotFoundError, OutOfRangeError, PermissionDeniedError, StatusError
from rpcmesh.v1 import registry_pb2

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    service TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    lease_id TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL,
    ttl_ms INTEGER NOT NULL,
    probe_passing INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (service, instance_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (revision INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_MAX_BATCH = 512


@dataclass
class _Job:
    run: Callable[[sqlite3.Connection], tuple[Any, list[Event]]]
    future: asyncio.Future[Any]


def _row_to_stored(row: tuple[str, int, int, bytes]) -> StoredInstance:
    token_hash, ttl_ms, probe_passing, data = row
    return StoredInstance(
        instance=registry_pb2.Instance.FromString(data),
        token_hash=token_hash,
        ttl_ms=ttl_ms,
        probe_passing=bool(probe_passing),
    )


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class SqliteRegistryStore:
    """Registry state in ``<data_dir>/registry.db``."""

    def __init__(self, path: Path, *, retain_events: int = 100_000, clock: Clock | None = None) -> None:
        self.path = path
        self.retain_events = retain_events
        self._leases = LeaseTable(clock) if clock is not None else LeaseTable()
        self._lease_lock = threading.Lock()
        # (lease_id, lease before the change) for every lease change of the running batch.
        self._lease_undo: list[tuple[str, Lease | None]] = []
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._revision = 0
        self._compact_revision = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: EventSink | None = None
        self._writer: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()

    @property
    def compact_revision(self) -> int:
        """Events up to this revision were compacted away."""
        return self._compact_revision

    @property
    def is_leader(self) -> bool:
        """Always: the embedded store has one node."""
        return True

    # -- lifecycle ---------------------------------------------------------------

    def _open_sync(self) -> Loaded:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path)
        conn.executescript(_SCHEMA)
        rows = conn.execute("SELECT token_hash, ttl_ms, probe_passing, data FROM instances").fetchall()
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        self._revision = int(meta.get("revision", 0))
        self._compact_revision = int(meta.get("compact_revision", 0))
        instances = [_row_to_stored(row) for row in rows]
        with self._lease_lock:
            for stored in instances:
                self._leases.grant(stored.lease_id, stored.key, stored.token_hash, stored.ttl_ms)
        self._conn = conn
        self._reader = _connect(self.path)
        return Loaded(instances=instances, revision=self._revision)

    async def open(self, sink: EventSink, reset: ResetSink | None = None) -> Loaded:
        """Open the file, load every instance and start the writer thread (``reset`` is never needed)."""
        self._loop = asyncio.get_running_loop()
        self._sink = sink
        loaded = await asyncio.to_thread(self._open_sync)
        self._writer = threading.Thread(target=self._write_loop, name="registry-sqlite-writer", daemon=True)
        self._writer.start()
        return loaded

    async def close(self) -> None:
        """Finish queued writes, stop the writer and close the file."""
        if self._writer is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        for conn in (self._conn, self._reader):
            if conn is not None:
                conn.close()
        self._conn = self._reader = None

    # -- writer thread -----------------------------------------------------------

    def _write_loop(self) -> None:
        assert self._conn is not None
        conn = self._conn
        while True:
            first = self._jobs.get()
            if first is None:
                return
            jobs = [first]
            stop = False
            while len(jobs) < _MAX_BATCH:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            self._run_batch(conn, jobs)
            if stop:
                return

    def _run_batch(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        events: list[Event] = []
        start_revision = self._revision
        self._lease_undo = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in jobs:
                try:
                    result, job_events = job.run(conn)
                except StatusError as exc:  # a rejected decision: nothing of this job was written
                    outcomes.append((job.future, None, exc))
                    continue
                events.extend(job_events)
                outcomes.append((job.future, result, None))
            if self._revision != start_revision:
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('revision', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (self._revision,),
                )
                self._compact(conn)
            conn.execute("COMMIT")
        except Exception as exc:
            logger.exception("registry commit failed")
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._revision = start_revision
            with self._lease_lock:
                for lease_id, previous in reversed(self._lease_undo):
                    self._leases.restore(lease_id, previous)
            outcomes = [(job.future, None, exc) for job in jobs]
            events = []
        self._lease_undo = []
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, events, outcomes)

    def _compact(self, conn: sqlite3.Connection) -> None:
        # Compact in steps so that deletes stay small and rare.
        step = max(1, self.retain_events // 8)
        if self._revision - self._compact_revision < self.retain_events + step:
            return
        new_compact = self._revision - self.retain_events
        conn.execute("DELETE FROM events WHERE revision <= ?", (new_compact,))
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('compact_revision', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (new_compact,),
        )
        self._compact_revision = new_compact

    def _deliver(
        self, events: list[Event], outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]
    ) -> None:
        if events and self._sink is not None:
            self._sink(events)
        for future, result, exc in outcomes:
            if future.done():
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def _read(self, conn: sqlite3.Connection, service: str, instance_id: str) -> StoredInstance | None:
        row = conn.execute(
            "SELECT token_hash, ttl_ms, probe_passing, data FROM instances "
            "WHERE service = ? AND instance_id = ?",
            (service, instance_id),
        ).fetchone()
        return _row_to_stored(row) if row is not None else None

    def _apply(self, conn: sqlite3.Connection, key: tuple[str, str], change: Change[Any]) -> list[Event]:
        """Write one decided change (writer thread, inside the batch transaction)."""
        stored = change.stored
        if change.event is not None:
            self._revision = change.event.revision
            if stored is None:
                conn.execute("DELETE FROM instances WHERE service = ? AND instance_id = ?", key)
            else:
                conn.execute(
                    "INSERT INTO instances"
                    "(service, instance_id, lease_id, token_hash, ttl_ms, probe_passing, data) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(service, instance_id) DO UPDATE SET "
                    "lease_id = excluded.lease_id, token_hash = excluded.token_hash, "
                    "ttl_ms = excluded.ttl_ms, probe_passing = excluded.probe_passing, data = excluded.data",
                    (
                        key[0],
                        key[1],
                        stored.lease_id,
                        stored.token_hash,
                        stored.ttl_ms,
                        int(stored.probe_passing),
                        stored.instance.SerializeToString(),
                    ),
                )
            conn.execute(
                "INSERT INTO events(revision, data) VALUES (?, ?)",
                (change.event.revision, change.event.to_proto().SerializeToString()),
            )
        with self._lease_lock:
            if stored is None:
                if change.event is not None:
                    lease_id = change.event.instance.lease_id
                    self._lease_undo.append((lease_id, self._leases.revoke(lease_id)))
            elif change.renew:
                self._lease_undo.append((stored.lease_id, self._leases.get(stored.lease_id)))
                self._leases.grant(stored.lease_id, key, stored.token_hash, stored.ttl_ms)
        return [change.event] if change.event is not None else []

    def _submit(self, run: Callable[[sqlite3.Connection], tuple[Any, list[Event]]]) -> asyncio.Future[Any]:
        if self._writer is None or self._loop is None:
            raise RuntimeError("registry store is not open")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._jobs.put(_Job(run, future))
        return future

    # -- operations --------------------------------------------------------------

    async def mutate(self, service: str, instance_id: str, decide: Decide[Any]) -> Committed[Any]:
        """Decide on the stored instance in the writer thread and commit."""
        key = (service, instance_id)

        def run(conn: sqlite3.Connection) -> tuple[Any, list[Event]]:
            change = decide(self._read(conn, service, instance_id), self._revision + 1)
            events = self._apply(conn, key, change)
            return Committed(change.result, self._revision, change.event), events

        committed: Committed[Any] = await self._submit(run)
        return committed

    async def renew(self, lease_id: str, lease_token: str) -> int:
        """Renew in memory: no disk write (a restart grants every lease its TTL anyway)."""
        with self._lease_lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                raise NotFoundError(f"lease {lease_id!r} is unknown or expired; register again")
            if not token_matches(lease.token_hash, lease_token):
                what = "missing" if not lease_token else "does not match"
                raise PermissionDeniedError(f"lease_token: {what} for lease {lease_id!r}")
            renewed = self._leases.renew(lease_id)
            if renewed is None:
                raise NotFoundError(f"lease {lease_id!r} has expired; register again")
            return renewed.ttl_ms

    async def expire_due(self) -> int:
        """Pop the leases past their deadline and delete their instances in one transaction."""
        with self._lease_lock:
            if self._leases.seconds_to_next_deadline() != 0.0:
                return 0

        def run(conn: sqlite3.Connection) -> tuple[Any, list[Event]]:
            with self._lease_lock:
                expired = self._leases.pop_expired()
            self._lease_undo.extend((lease.lease_id, lease) for lease in expired)
            events: list[Event] = []
            for lease in expired:
                change = transitions.expire(
                    self._read(conn, *lease.key), self._revision + 1, lease_id=lease.lease_id
                )
                events.extend(self._apply(conn, lease.key, change))
            return len(events), events

        count: int = await self._submit(run)
        return count

    def seconds_to_next_expiry(self) -> float:
        """Time to the earliest lease deadline (1 s when there is none)."""
        with self._lease_lock:
            remaining = self._leases.seconds_to_next_deadline()
        return 1.0 if remaining is None else remaining

    def _events_after_sync(self, revision: int, limit: int) -> list[Event]:
        assert self._reader is not None
        with self._reader_lock:
            rows = self._reader.execute(
                "SELECT data FROM events WHERE revision > ? ORDER BY revision LIMIT ?", (revision, limit)
            ).fetchall()
        return [Event.from_proto(registry_pb2.WatchEvent.FromString(row[0])) for row in rows]

    async def stored_revision(self) -> int:
        """The revision written to the file (the node's view is this store: nothing to catch up)."""
        return self._revision

    async def events_after(self, revision: int, limit: int) -> list[Event]:
        """Read retained events from the file (WAL readers do not block the writer)."""
        self._check_retained(revision)
        events = await asyncio.to_thread(self._events_after_sync, revision, limit)
        self._check_retained(revision)
        return events

    def _check_retained(self, revision: int) -> None:
        if revision < self._compact_revision:
            raise OutOfRangeError(
                f"after_revision: events after {revision} are no longer retained "
                f"(oldest retained revision is {self._compact_revision + 1}); "
                "watch again from 0 for a snapshot"
            )
