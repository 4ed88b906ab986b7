"""The shared Registry store: PostgreSQL (psycopg 3 async), for more than one Registry node.

Every write transaction first locks the single ``registry_meta`` row, so
revisions are assigned and committed in one total order. Each node batches its
writes (many mutations per transaction, many renewals per statement: see
:mod:`.postgres_writes`). A node therefore
tails ``registry_events`` (woken by LISTEN/NOTIFY, and polling as a safety
net) and applies events to its view without gaps or duplicates.

Leases expire the etcd way, on a monotonic clock. No deadline is stored:
each lease row has a renewal counter that every renewal (through any node)
bumps, announcing it with a NOTIFY in the same transaction. One node leads
expiry: it holds a session advisory lock on a dedicated connection that also
LISTENs for those renewals, and keeps every lease's deadline on its own
``time.monotonic()`` (see :mod:`.renewal_tracker`); when it takes over, every
lease gets its full TTL again. When the leader dies its session ends, the
lock is released and another node takes over. A leader that is alive but
unresponsive (frozen by SIGSTOP, a stalled host, a cut-off network) loses it
too: its lock session carries ``idle_session_timeout = session_timeout`` (and
TCP keepalives and ``tcp_user_timeout``), it heartbeats every
``heartbeat_interval``, and it expires nothing unless its last heartbeat was
sent less than ``session_timeout - margin`` ago, so once PostgreSQL has ended the
frozen session and another node leads, the old leader, when it wakes, expires
nothing until it has stepped down. The leader expires a lease with
a delete conditional on the renewal counter it saw, under the revision lock,
so a renewal racing the expiry wins and each lease expires exactly once.
Neither the database's ``now()`` nor any wall clock is read for expiry.

Caveats: a lease past its deadline can still be renewed until the leader
deletes it (one expiry check, ``expiry_interval``, at most while a leader
runs); while no node holds the lock (all stopped, or for up to ``session_timeout``
after the leader froze) nothing expires.

A node that finds the shared log compacted past what it applied (it was frozen
or cut off for longer than the retained window) cannot replay the gap: it reads
the whole state again and hands it to the node's reset callback, which rebuilds
the view and ends its watches with OUT_OF_RANGE so their clients take a snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from rpcmesh.controlplane.registry import transitions
from rpcmesh.controlplane.registry.leases import Clock
from rpcmesh.controlplane.registry.model import Committed, Event
from rpcmesh.controlplane.registry.postgres_writes import RENEW_CHANNEL, BatchedWrites, stored_from_row
from rpcmesh.controlplane.registry.renewal_tracker import RenewalTracker, Sighting
from rpcmesh.controlplane.registry.store import Decide, EventSink, Loaded, ResetSink
from rpcmesh.errors import OutOfRangeError, UnavailableError
from rpcmesh.tasks import start_supervised, stop_tasks
from rpcmesh.v1 import registry_pb2

logger = logging.getLogger(__name__)

CHANNEL = "rpcmesh_registry"
_SCHEMA_LOCK = 0x52454749  # "REGI": serialises schema creation between nodes starting together
_LEADER_LOCK = 0x5245474C  # "REGL": held (session lock) by the node that expires leases
LEADER_APPLICATION_PREFIX = "rpcmesh-registry-leader-"
"""``application_name`` of a node's lock session, followed by its process id (seen in pg_stat_activity)."""
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS registry_instances (
        service TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        lease_id TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL,
        ttl_ms BIGINT NOT NULL,
        probe_passing BOOLEAN NOT NULL,
        data BYTEA NOT NULL,
        renewals BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (service, instance_id))""",
    # Databases created by earlier development builds kept wall-clock deadlines.
    "ALTER TABLE registry_instances DROP COLUMN IF EXISTS expires_at",
    "ALTER TABLE registry_instances ADD COLUMN IF NOT EXISTS renewals BIGINT NOT NULL DEFAULT 0",
    "CREATE TABLE IF NOT EXISTS registry_events (revision BIGINT PRIMARY KEY, data BYTEA NOT NULL)",
    """CREATE TABLE IF NOT EXISTS registry_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        revision BIGINT NOT NULL,
        compact_revision BIGINT NOT NULL)""",
    "INSERT INTO registry_meta (id, revision, compact_revision) VALUES (1, 0, 0) ON CONFLICT DO NOTHING",
]
_SELECT = "SELECT token_hash, ttl_ms, probe_passing, data FROM registry_instances"
_EXPIRE_BATCH = 1000
_PAGE = 1000

Conn = psycopg.AsyncConnection[tuple[Any, ...]]


def parse_renewal(payload: str) -> Sighting | None:
    """A renewal notification's payload ("lease_id renewals ttl_ms"), or None when malformed."""
    parts = payload.split(" ")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return Sighting(parts[0], int(parts[2]), int(parts[1]))


def bounded_conninfo(url: str, timeout: float, **extra: str) -> str:
    """``url`` with the libpq settings that notice a dead server or network within ~``timeout``."""
    seconds = max(1, int(timeout / 3))
    return make_conninfo(
        url,
        keepalives=1,
        keepalives_idle=seconds,
        keepalives_interval=seconds,
        keepalives_count=3,
        tcp_user_timeout=int(timeout * 1000),
        **extra,
    )


class PostgresRegistryStore:
    """Registry state in PostgreSQL, shared by every node pointed at the same database."""

    def __init__(
        self,
        url: str,
        *,
        retain_events: int = 100_000,
        poll_interval: float = 0.5,
        expiry_interval: float = 0.2,
        leader_retry_interval: float = 0.5,
        session_timeout: float = 3.0,
        heartbeat_interval: float = 0.5,
        margin: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 0 < heartbeat_interval < session_timeout - margin:
            raise ValueError("heartbeat_interval: must be positive and below session_timeout - margin")
        self.url = url
        self.retain_events = retain_events
        self.poll_interval = poll_interval
        self.expiry_interval = expiry_interval
        self.leader_retry_interval = leader_retry_interval
        self.session_timeout = session_timeout
        """``idle_session_timeout`` of the lock session: takeover time after the leader froze."""
        self.heartbeat_interval = heartbeat_interval
        self.margin = margin
        """The leader stops expiring this long before PostgreSQL could end its silent session."""
        self._lease_until = 0.0
        self._tracker = RenewalTracker(clock)
        self._leader = False
        self._pool: AsyncConnectionPool | None = None
        self._sink: EventSink | None = None
        self._reset: ResetSink | None = None
        self._applied = 0
        self._compact_revision = 0
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._writes: BatchedWrites | None = None

    @property
    def is_leader(self) -> bool:
        """This node holds the expiry lock, its session proved alive recently, and it tracks leases."""
        return self._lease_valid()

    @property
    def compact_revision(self) -> int:
        """Events up to this revision were compacted away (as last seen by this node)."""
        return self._compact_revision

    @property
    def writes(self) -> BatchedWrites | None:
        """The node's batched writers (their counters show how many transactions they took)."""
        return self._writes

    def _writes_or_fail(self) -> BatchedWrites:
        if self._writes is None:
            raise RuntimeError("registry store is not open")
        return self._writes

    def _pool_or_fail(self) -> AsyncConnectionPool:
        if self._pool is None:
            raise RuntimeError("registry store is not open")
        return self._pool

    async def open(self, sink: EventSink, reset: ResetSink | None = None) -> Loaded:
        """Create the schema, load the state, start tailing and contend for expiry leadership."""
        self._sink = sink
        self._reset = reset
        pool = AsyncConnectionPool(self.url, min_size=1, max_size=8, kwargs={"autocommit": True}, open=False)
        await pool.open(wait=True, timeout=30)
        self._pool = pool
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in _SCHEMA:
                await conn.execute(statement)
        loaded = await self._load()
        self._writes = BatchedWrites(pool, self._finish, self._wakeup.set)
        self._writes.start()
        self._tasks = [
            start_supervised(self._listen, name="registry-pg-listen"),
            start_supervised(self._tail, name="registry-pg-tail"),
            start_supervised(self._lead, name="registry-pg-lead"),
        ]
        return loaded

    async def _load(self) -> Loaded:
        """Read every instance and the revision they are at, in one snapshot."""
        pool = self._pool_or_fail()
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            meta = await (
                await conn.execute("SELECT revision, compact_revision FROM registry_meta")
            ).fetchone()
            rows = await (await conn.execute(_SELECT)).fetchall()
        assert meta is not None
        self._applied, self._compact_revision = int(meta[0]), int(meta[1])
        return Loaded(instances=[stored_from_row(row) for row in rows], revision=self._applied)

    async def close(self) -> None:
        """Stop tailing and close the pool."""
        if self._writes is not None:
            await self._writes.stop()
            self._writes = None
        await stop_tasks(self._tasks)
        self._tasks = []
        self._leader = False
        self._tracker.clear()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # -- expiry leadership ------------------------------------------------------

    def _lease_valid(self) -> bool:
        return self._leader and time.monotonic() < self._lease_until

    async def _lead(self) -> None:
        """Contend for the expiry lock, hold it while the session proves alive; step down on loss."""
        while True:
            try:
                await self._hold_lock()
            except (psycopg.Error, OSError, TimeoutError):
                logger.warning("registry expiry-leader connection lost; contending again", exc_info=True)
            finally:
                # Also on cancellation or an unexpected error (the supervisor restarts this loop).
                if self._leader:
                    logger.warning("registry node no longer leads lease expiry")
                self._leader = False
                self._lease_until = 0.0
                self._tracker.clear()
            await asyncio.sleep(self.leader_retry_interval)

    async def _hold_lock(self) -> None:
        conninfo = bounded_conninfo(
            self.url, self.session_timeout, application_name=f"{LEADER_APPLICATION_PREFIX}{os.getpid()}"
        )
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        async with conn:
            # PostgreSQL ends a session that sends nothing for this long (a leader frozen by SIGSTOP,
            # a stalled host, a cut-off network), which frees the lock for another node.
            await conn.execute(f"SET idle_session_timeout = {int(self.session_timeout * 1000)}")
            while True:
                sent = time.monotonic()
                row = await (
                    await conn.execute("SELECT pg_try_advisory_lock(%s)", (_LEADER_LOCK,))
                ).fetchone()
                if row is not None and row[0]:
                    break
                await asyncio.sleep(self.leader_retry_interval)
            # LISTEN before reading: a renewal committed in between is seen twice, never missed.
            await conn.execute(f"LISTEN {RENEW_CHANNEL}")
            rows = await (
                await conn.execute("SELECT lease_id, ttl_ms, renewals FROM registry_instances")
            ).fetchall()
            # Like etcd's new leader: every lease gets its full TTL again, so a restart
            # or a leader change does not expire healthy instances.
            self._tracker.take_over(Sighting(str(r[0]), int(r[1]), int(r[2])) for r in rows)
            self._lease_until = sent + self.session_timeout - self.margin
            self._leader = True
            logger.info("registry node leads lease expiry (%d leases)", len(rows))
            await self._beat(conn, sent)

    async def _beat(self, conn: Conn, sent: float) -> None:
        """Follow renewals on the lock connection and prove the session alive, until it fails."""
        next_beat = sent + self.heartbeat_interval
        while True:
            remaining = next_beat - time.monotonic()
            if remaining > 0:
                async for note in conn.notifies(timeout=remaining):
                    sighting = parse_renewal(note.payload)
                    if sighting is not None:
                        self._tracker.observe(sighting)
                continue
            sent = time.monotonic()
            await asyncio.wait_for(conn.execute("SELECT 1"), self.session_timeout - self.margin)
            # The session was alive when the heartbeat was sent: PostgreSQL cannot end it (and free
            # the lock) before sent + session_timeout, and this node stops expiring a margin earlier.
            self._lease_until = sent + self.session_timeout - self.margin
            next_beat = sent + self.heartbeat_interval

    # -- tailing the shared log --------------------------------------------------

    async def _listen(self) -> None:
        while True:
            try:
                conninfo = bounded_conninfo(self.url, self.session_timeout)
                conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._wakeup.set()  # catch up on whatever happened before LISTEN
                    async for _ in conn.notifies():
                        self._wakeup.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("registry LISTEN connection lost; reconnecting", exc_info=True)
                await asyncio.sleep(1.0)

    async def _tail(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.poll_interval)
            self._wakeup.clear()
            try:
                await self._catch_up()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("registry could not read the event log; retrying", exc_info=True)
                await asyncio.sleep(0.5)

    async def _catch_up(self) -> None:
        pool = self._pool_or_fail()
        while True:
            async with pool.connection() as conn:
                rows = await (
                    await conn.execute(
                        "SELECT revision, data FROM registry_events WHERE revision > %s "
                        "ORDER BY revision LIMIT %s",
                        (self._applied, _PAGE),
                    )
                ).fetchall()
                meta = await (await conn.execute("SELECT compact_revision FROM registry_meta")).fetchone()
            if meta is not None:
                self._compact_revision = max(self._compact_revision, int(meta[0]))
            if not rows:
                return
            if int(rows[0][0]) != self._applied + 1:
                # Compacted past us: the gap cannot be replayed, so the node starts from a snapshot.
                behind = self._applied
                loaded = await self._load()
                logger.warning(
                    "registry event log compacted past revision %d; reloaded the state at revision %d",
                    behind,
                    loaded.revision,
                )
                if self._reset is not None:
                    self._reset(loaded)
                continue
            events = [Event.from_proto(registry_pb2.WatchEvent.FromString(bytes(row[1]))) for row in rows]
            self._applied = events[-1].revision
            if self._sink is not None:
                self._sink(events)
            if len(rows) < _PAGE:
                return

    # -- writes ------------------------------------------------------------------

    async def _lock_revision(self, conn: Conn) -> tuple[int, int]:
        """Lock the meta row; returns the revision and compaction point it holds."""
        row = await (
            await conn.execute("SELECT revision, compact_revision FROM registry_meta WHERE id = 1 FOR UPDATE")
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    async def _finish(self, conn: Conn, revision: int, compact: int) -> None:
        """Record the new revision, compact when due, and notify the other nodes (on commit).

        ``compact`` is the compaction point read under the revision lock this transaction holds,
        not what this node last read from the log: another node may have compacted further since,
        and the point must never move back below events that are gone (a Watch resuming from
        between would be served the log after a hole). ``GREATEST`` keeps it so regardless.
        """
        step = max(1, self.retain_events // 8)
        if revision - compact >= self.retain_events + step:
            compact = revision - self.retain_events
            await conn.execute("DELETE FROM registry_events WHERE revision <= %s", (compact,))
        await conn.execute(
            "UPDATE registry_meta SET revision = %s, compact_revision = GREATEST(compact_revision, %s) "
            "WHERE id = 1",
            (revision, compact),
        )
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(revision)))

    async def mutate(self, service: str, instance_id: str, decide: Decide[Any]) -> Committed[Any]:
        """Decide on the row in the node's next write batch (one transaction under the revision lock)."""
        return await self._writes_or_fail().mutate(service, instance_id, decide)

    async def renew(self, lease_id: str, lease_token: str) -> int:
        """Bump the lease's renewal counter (and tell the expiry leader); any node's renewal counts.

        Renewals queued together are one statement (see :mod:`.postgres_writes`).
        """
        return await self._writes_or_fail().renew(lease_id, lease_token)

    async def expire_due(self) -> int:
        """Leader only: delete the overdue leases whose renewal counter did not move.

        The delete runs under the revision lock with the rows locked and is
        conditional on the counter the leader saw, so a renewal that committed
        first wins (its lease gets a new deadline), one that comes later finds
        the lease gone, and each lease expires exactly once.
        """
        if not self._lease_valid():
            return 0
        due = {lease.lease_id: lease.renewals for lease in self._tracker.due(_EXPIRE_BATCH)}
        if not due:
            return 0
        pool = self._pool_or_fail()
        found: dict[str, int] = {}
        expired: list[str] = []
        async with pool.connection() as conn, conn.transaction():
            revision, compact = await self._lock_revision(conn)
            rows = await (
                await conn.execute(
                    "SELECT lease_id, renewals, token_hash, ttl_ms, probe_passing, data "
                    "FROM registry_instances WHERE lease_id = ANY(%s) ORDER BY lease_id FOR UPDATE",
                    (list(due),),
                )
            ).fetchall()
            for row in rows:
                lease_id, renewals = str(row[0]), int(row[1])
                found[lease_id] = renewals
                if renewals != due[lease_id]:
                    continue  # renewed since the leader last looked: the renewal wins
                stored = stored_from_row(row[2:])
                change = transitions.expire(stored, revision + 1, lease_id=lease_id)
                if change.event is None:
                    continue
                deleted = await conn.execute(
                    "DELETE FROM registry_instances WHERE lease_id = %s AND renewals = %s",
                    (lease_id, renewals),
                )
                if deleted.rowcount != 1:
                    continue
                await conn.execute(
                    "INSERT INTO registry_events (revision, data) VALUES (%s, %s)",
                    (change.event.revision, change.event.to_proto().SerializeToString()),
                )
                revision = change.event.revision
                expired.append(lease_id)
            if expired:
                await self._finish(conn, revision, compact)
        for lease_id in expired:
            self._tracker.forget(lease_id)
        for lease_id in due:
            if lease_id not in expired:
                self._tracker.settle(lease_id, found.get(lease_id))
        if expired:
            self._wakeup.set()
        return len(expired)

    def seconds_to_next_expiry(self) -> float:
        """The leader sleeps until its earliest deadline; the others check leadership every interval."""
        if not self._lease_valid():
            return self.expiry_interval
        remaining = self._tracker.seconds_to_next_deadline()
        return self.expiry_interval if remaining is None else remaining

    async def stored_revision(self) -> int:
        """The revision committed in the database (this node's view may not have read it yet)."""
        pool = self._pool_or_fail()
        try:
            async with pool.connection() as conn:
                row = await (await conn.execute("SELECT revision FROM registry_meta WHERE id = 1")).fetchone()
        except (psycopg.Error, OSError) as exc:
            raise UnavailableError(f"the registry database cannot be reached: {exc}") from exc
        assert row is not None
        return int(row[0])

    async def events_after(self, revision: int, limit: int) -> list[Event]:
        """Retained events after ``revision`` from the shared log.

        Raises OUT_OF_RANGE when events after ``revision`` are compacted away: when the point
        says so, and also when the first retained event is not ``revision + 1`` (a log whose
        point was set back, as builds before the locked read of the point could leave it, has a
        hole that must not be served as if nothing were missing).
        """
        pool = self._pool_or_fail()
        async with pool.connection() as conn:
            rows = await (
                await conn.execute(
                    "SELECT revision, data FROM registry_events WHERE revision > %s "
                    "ORDER BY revision LIMIT %s",
                    (revision, limit),
                )
            ).fetchall()
            meta = await (await conn.execute("SELECT compact_revision FROM registry_meta")).fetchone()
        compact = int(meta[0]) if meta is not None else 0
        self._compact_revision = max(self._compact_revision, compact)
        if revision < compact or (rows and int(rows[0][0]) != revision + 1):
            oldest = max(compact, int(rows[0][0]) - 1 if rows else 0) + 1
            raise OutOfRangeError(
                f"after_revision: events after {revision} are no longer retained "
                f"(oldest retained revision is {oldest}); watch again from 0 for a snapshot"
            )
        return [Event.from_proto(registry_pb2.WatchEvent.FromString(bytes(row[1]))) for row in rows]
