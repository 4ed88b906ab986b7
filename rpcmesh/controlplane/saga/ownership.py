"""Several SagaCoordinator nodes on one PostgreSQL store: one node drives the sagas, every node serves.

Exactly one node at a time *drives* (runs the runners of) the sagas of a store:
the one holding the session advisory lock :data:`SAGA_LEADER_LOCK`, taken with
``pg_try_advisory_lock`` on a dedicated connection, as the Registry's expiry
leader does. Every node accepts every RPC:

* StartSaga appends the saga's first events to its stream itself (NO_STREAM), so
  the same idempotency key gives one saga whichever nodes it is sent to;
  AbortSaga appends AbortRequested at the revision the node read; GetSaga and
  WatchSaga on a node that does not drive read the stream from the store.
* Every node follows the EventStore's position-ordered global log (``saga-`` and
  ``sagadef-`` streams, read every ``poll_interval``). Followers mirror every
  transition, so their ListSagas, WatchSaga and GetSaga long polls stay current.
  The leader reads only SagaStarted, AbortRequested, the operator actions
  (CompensationRetryRequested, SagaResolved) and DefinitionRegistered (the
  event-type index; it wrote everything else itself): it adopts and runs sagas
  started elsewhere, takes an abort into the running saga at once and resumes a
  saga an operator asked to compensate again. It
  also LISTENs on its lock connection for :data:`NUDGE_CHANNEL`, which a
  follower NOTIFYs after StartSaga, AbortSaga and the operator verbs, so a saga started through a
  follower begins without waiting for the poll. The other way round, the leader
  NOTIFYs :data:`CHANGED_CHANNEL` after it appends (at most once per
  ``announce_interval``, 20 ms), which followers LISTEN for on their contending
  connection, so a follower's WatchSaga and GetSaga/StartSaga long polls see
  transitions within milliseconds, not at the next poll.
* When the leader dies (``kill -9``, a lost connection) PostgreSQL ends its
  session and frees the lock; another node's next try takes it, catches up
  with the log and resumes every unfinished saga from its recorded transitions.
  A step whose outcome was not recorded is invoked again with the same
  idempotency key.

A leader that cannot reach PostgreSQL does not keep driving on its own: its
lease lasts ``session_timeout - margin`` seconds from the last heartbeat sent on
the lock connection, and the engine checks it before every participant call and
every runner write (``SagaEngine.lease``). The lock session itself carries
``idle_session_timeout = session_timeout``, so PostgreSQL ends the session of a
leader that stops heartbeating (frozen by SIGSTOP, a stalled host, a network
partition) and another node takes over after ``session_timeout`` seconds; by
then the frozen node's lease has run out, and when it wakes it stops without
making another call or write. Calls already in flight when it froze may still
reach participants (with the same idempotency key). If PostgreSQL ends the lock
session while the leader runs normally (a database restart, a dropped
connection), the leader stops driving when its connection reports the loss (at
once while it waits on it between heartbeats), and a new leader may have started
just before: transitions stay exactly-once (expected revisions), calls are
at-least-once, as across a restart on one node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from typing import Any

import psycopg

from rpcmesh.controlplane.eventstore.model import StoredEvent
from rpcmesh.controlplane.eventstore.postgres import PostgresEventStorage
from rpcmesh.controlplane.saga.engine import SagaEngine
from rpcmesh.controlplane.saga.machine import (
    ABORT_REQUESTED,
    COMPENSATION_RETRY_REQUESTED,
    SAGA_RESOLVED,
    SAGA_STARTED,
)
from rpcmesh.controlplane.saga.records import (
    DEFINITION_REGISTERED,
    DEFINITION_STREAM_PREFIX,
    SAGA_STREAM_PREFIX,
    UNREADABLE,
)
from rpcmesh.tasks import stop_tasks

logger = logging.getLogger(__name__)

SAGA_LEADER_LOCK = 7406222
"""The advisory lock key whose holder drives the sagas of a store."""
NUDGE_CHANNEL = "rpcmesh_saga_nudge"
"""NOTIFY channel: a follower recorded something the leader should act on now."""
CHANGED_CHANNEL = "rpcmesh_saga_changed"
"""NOTIFY channel: the leader recorded transitions (at most one per ``announce_interval``)."""
_PAGE = 1000
# Operator actions (RetryCompensation, ResolveSaga) recorded through any node are obeyed by the leader.
_LEADER_TYPES = (
    SAGA_STARTED,
    ABORT_REQUESTED,
    COMPENSATION_RETRY_REQUESTED,
    SAGA_RESOLVED,
    DEFINITION_REGISTERED,
)


class SagaOwnership:
    """Follows the shared log and contends for the saga lease for one node's engine.

    Args:
        engine: This node's engine, created with ``shared=True`` and ``driving=False``.
        url: The PostgreSQL store (the EventStore's database).
        poll_interval: Longest wait between reads of the global log.
        retry_interval: How often a follower tries to take the lock.
        session_timeout: ``idle_session_timeout`` of the lock session: how long after
            the leader's last heartbeat PostgreSQL ends its session (the takeover time
            after a freeze).
        heartbeat_interval: How often the leader proves its session (well under
            ``session_timeout``).
        margin: The leader stops driving this long before PostgreSQL could end its session.
        announce_interval: The leader tells followers it recorded transitions at most this
            often (they LISTEN on their contending connection and read the log at once).
    """

    def __init__(
        self,
        engine: SagaEngine,
        url: str,
        *,
        poll_interval: float = 0.1,
        retry_interval: float = 0.25,
        session_timeout: float = 5.0,
        heartbeat_interval: float = 1.0,
        margin: float = 1.0,
        announce_interval: float = 0.02,
    ) -> None:
        if not 0 < heartbeat_interval < session_timeout - margin:
            raise ValueError("heartbeat_interval must be positive and below session_timeout - margin")
        self.engine = engine
        self.url = url
        self.poll_interval = poll_interval
        self.retry_interval = retry_interval
        self.session_timeout = session_timeout
        self.heartbeat_interval = heartbeat_interval
        self.margin = margin
        self.announce_interval = announce_interval
        self._position = 1
        # While leading, reads skip other nodes' transitions; a node that stops leading reads the
        # log again from where it last knew it held the lock (the last heartbeat sent and answered).
        self._rewind_to = 1
        self._pull_lock = asyncio.Lock()
        self._lease_until = 0.0
        self._leader = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        engine.shared = True
        engine.driving = False
        engine.lease = self.lease_valid

    @property
    def is_leader(self) -> bool:
        """This node holds the lock and drives the sagas."""
        return self._leader

    def lease_valid(self) -> bool:
        """Whether this node may still call participants and record for its sagas."""
        return self._leader and time.monotonic() < self._lease_until

    async def nudge(self) -> None:
        """Tell the leader (if this node is not it) to read the log now; best effort."""
        storage = self.engine.storage
        if self._leader or not isinstance(storage, PostgresEventStorage):
            return
        try:
            await storage.notify(NUDGE_CHANNEL)
        except Exception:  # the leader still polls
            logger.warning("saga coordinator could not notify the leader", exc_info=True)

    def follow(self, from_position: int) -> None:
        """Start mirroring the log from ``from_position`` (the head before the engine loaded, plus 1)."""
        self._position = max(1, from_position)
        self._tasks.append(asyncio.create_task(self._follow(), name="saga-log-follow"))

    def contend(self) -> None:
        """Start contending for the lock (once the Registry answers, so resumed steps find participants)."""
        self._tasks.append(asyncio.create_task(self._contend(), name="saga-lead"))

    async def stop(self) -> None:
        """Stop following and contending; closing the lock connection frees the lock."""
        self._leader = False  # runners stop acting before another node can take the lock
        await stop_tasks(self._tasks)
        self._tasks = []

    # -- the log ----------------------------------------------------------------------------------

    async def _follow(self) -> None:
        while True:
            try:
                self._wake.clear()
                await self.pull()
                # Our own appends are applied already: other nodes' are polled for (or nudged).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("saga coordinator could not read the event log; retrying", exc_info=True)
                await asyncio.sleep(max(self.poll_interval, 0.5))

    async def pull(self) -> int:
        """Mirror everything recorded since the last read; returns the log head read."""
        async with self._pull_lock:
            while True:
                # The leader writes nearly everything itself: it reads only what others start, abort
                # or register (served by the event-type index), not its own transitions back.
                leading = self._leader
                events, head = await self.engine.storage.read_all(
                    self._position,
                    limit=_PAGE,
                    event_types=_LEADER_TYPES if leading else (),
                    stream_prefixes=[SAGA_STREAM_PREFIX, DEFINITION_STREAM_PREFIX],
                )
                await self._apply(events, leading)
                if len(events) < _PAGE:
                    self._position = max(self._position, head + 1)
                    return head
                self._position = events[-1].position + 1

    async def _apply(self, events: list[StoredEvent], leading: bool) -> None:
        engine = self.engine
        by_saga: dict[str, list[StoredEvent]] = defaultdict(list)
        for event in events:
            # This node's own writes come back too: the engine knows them by revision and skips them.
            saga_id = event.stream.removeprefix(SAGA_STREAM_PREFIX)
            try:
                if event.stream.startswith(DEFINITION_STREAM_PREFIX):
                    await engine.definitions.observe(event)
                elif not leading:
                    by_saga[saga_id].append(event)
                elif event.event_type == SAGA_STARTED:
                    await engine.fetch_saga(saga_id)  # adopt, run
                else:
                    await engine.observe_saga(saga_id, [event])
            except UNREADABLE:
                _skip(event.stream, event.position)
        for saga_id, saga_events in by_saga.items():
            try:
                await engine.observe_saga(saga_id, saga_events)
            except UNREADABLE:
                _skip(SAGA_STREAM_PREFIX + saga_id, saga_events[0].position)

    # -- leadership ------------------------------------------------------------------------------

    async def _contend(self) -> None:
        while True:
            try:
                await self._hold_lock()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("saga leader connection lost; contending again", exc_info=True)
            if self._leader:
                self._leader = False
                logger.warning("saga coordinator no longer drives sagas; another node takes over")
                await self.engine.step_down()
                async with self._pull_lock:
                    # A new leader can only have written after our last answered heartbeat.
                    self._position = min(self._position, self._rewind_to)
            await asyncio.sleep(self.retry_interval)

    async def _hold_lock(self) -> None:
        conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        async with conn:
            timeout_ms = int(self.session_timeout * 1000)
            await conn.execute(f"SET idle_session_timeout = {timeout_ms}")
            # A follower hears on this connection when the leader recorded something.
            await conn.execute(f"LISTEN {CHANGED_CHANNEL}")
            while True:
                sent = time.monotonic()
                row = await (
                    await conn.execute("SELECT pg_try_advisory_lock(%s)", (SAGA_LEADER_LOCK,))
                ).fetchone()
                if row is not None and row[0]:
                    break
                async for _ in conn.notifies(timeout=self.retry_interval):
                    self._wake.set()
            await conn.execute(f"UNLISTEN {CHANGED_CHANNEL}")
            self._lease_until = sent + self.session_timeout - self.margin
            await conn.execute(f"LISTEN {NUDGE_CHANNEL}")
            # Everything recorded until now is mirrored before the runners start; then a heartbeat
            # (the catch-up may have been long) so the lease is fresh when they do.
            await self.pull()
            sent = await self._heartbeat(conn)
            self._leader = True
            resumed = self.engine.take_over()
            logger.info("saga coordinator drives the sagas of the store (%d unfinished resumed)", resumed)
            announcer = asyncio.create_task(self._announce(), name="saga-announce")
            try:
                await self._beat(conn, sent)
            finally:
                await stop_tasks([announcer])

    async def _beat(self, conn: psycopg.AsyncConnection[Any], sent: float) -> None:
        """Heartbeat on the lock connection and hear nudges in between, until it fails."""
        next_beat = sent + self.heartbeat_interval
        while True:
            remaining = next_beat - time.monotonic()
            if remaining > 0:
                async for _ in conn.notifies(timeout=remaining, stop_after=1):
                    self._wake.set()
                continue
            sent = await self._heartbeat(conn)
            next_beat = sent + self.heartbeat_interval
            # Without a restart on this node, a saga whose runner failed would wait for the next leader.
            if restarted := self.engine.restart_failed():
                logger.warning("saga coordinator restarted %d saga runners that had failed", restarted)

    async def _heartbeat(self, conn: psycopg.AsyncConnection[Any]) -> float:
        """Prove the lock session is alive; renews the lease from when it was sent (returned)."""
        read_to = self._position
        sent = time.monotonic()
        await asyncio.wait_for(conn.execute("SELECT 1"), self.session_timeout - self.margin)
        self._lease_until = sent + self.session_timeout - self.margin
        self._rewind_to = read_to
        return sent

    async def _announce(self) -> None:
        """While leading: NOTIFY followers that transitions were recorded, coalesced."""
        storage = self.engine.storage
        if not isinstance(storage, PostgresEventStorage):
            return
        seen = storage.local_head
        while True:
            await storage.wait_for_append(seen, 1.0)  # woken by this process's appends
            if storage.local_head > seen:
                seen = storage.local_head
                try:
                    await storage.notify(CHANGED_CHANNEL)
                except Exception:  # followers still poll
                    logger.warning("saga coordinator could not notify the followers", exc_info=True)
                await asyncio.sleep(self.announce_interval)


def _skip(stream: str, position: int) -> None:
    """Log events the coordinator did not write (see ``UNREADABLE``); following goes on past them."""
    logger.exception("saga coordinator skips %s from position %d: not saga records", stream, position)
