"""Batched writes of the PostgreSQL Registry store: mutations per transaction, renewals per statement.

Mutations (register, update, deregister, probe verdicts) queue while a batch is
in flight and commit together: one transaction takes the revision lock once,
reads and locks every row the batch touches in one statement (in ``lease_id``
order, the order renewals and expiry lock rows in too, so batches cannot
deadlock), runs each decision in arrival order on the state as the earlier
members of the batch left it, and sends every write, one event insert and the
revision update in one pipeline. Revisions stay consecutive and in commit
order. A decision that refuses (a ``StatusError``) fails alone and writes
nothing; a transaction that fails as a whole is retried mutation by mutation,
so one bad member fails alone; a lost connection fails its batch (the outcome
is unknown, so nothing is replayed).

Renewals queue the same way and commit as one autocommit ``UPDATE … FROM
unnest(…)`` that bumps each lease's renewal counter (once per lease and token,
however often it is in the batch) and sends the expiry leader one NOTIFY per
lease, in the format a single renewal always used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from rpcmesh.controlplane.registry.model import Change, Committed, StoredInstance, hash_token
from rpcmesh.errors import NotFoundError, PermissionDeniedError, StatusError
from rpcmesh.tasks import start_supervised, stop_tasks
from rpcmesh.v1 import registry_pb2

MAX_BATCH = 512
"""Mutations or renewals committed together at most."""

RENEW_CHANNEL = "rpcmesh_registry_renew"

_LOCK_ROWS = (
    "SELECT service, instance_id, token_hash, ttl_ms, probe_passing, data FROM registry_instances "
    "WHERE (service, instance_id) IN (SELECT * FROM unnest(%s::text[], %s::text[])) "
    "ORDER BY lease_id FOR UPDATE"
)
_DELETE = "DELETE FROM registry_instances WHERE service = %s AND instance_id = %s"
_UPSERT = (
    "WITH written AS (INSERT INTO registry_instances "
    "(service, instance_id, lease_id, token_hash, ttl_ms, probe_passing, data) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (service, instance_id) DO UPDATE SET lease_id = excluded.lease_id, "
    "token_hash = excluded.token_hash, ttl_ms = excluded.ttl_ms, "
    "probe_passing = excluded.probe_passing, data = excluded.data, "
    "renewals = registry_instances.renewals + CASE WHEN %s THEN 1 ELSE 0 END "
    "RETURNING lease_id, renewals, ttl_ms) "
    "SELECT pg_notify(%s, lease_id || ' ' || renewals || ' ' || ttl_ms) FROM written WHERE %s"
)
_RENEW_ROW = (
    "WITH renewed AS (UPDATE registry_instances SET renewals = renewals + 1 "
    "WHERE lease_id = %s RETURNING lease_id, renewals, ttl_ms) "
    "SELECT pg_notify(%s, lease_id || ' ' || renewals || ' ' || ttl_ms) FROM renewed"
)
_INSERT_EVENTS = (
    "INSERT INTO registry_events (revision, data) SELECT * FROM unnest(%s::bigint[], %s::bytea[])"
)
# Rows are locked in lease_id order (as _LOCK_ROWS and expiry do); a lease in the batch twice
# with the same token is bumped once and answers both callers.
_RENEW_MANY = (
    "WITH wanted AS (SELECT DISTINCT lease_id, token_hash "
    "FROM unnest(%s::text[], %s::text[]) AS k(lease_id, token_hash)), "
    "locked AS (SELECT r.lease_id, w.token_hash FROM registry_instances r "
    "JOIN wanted w ON r.lease_id = w.lease_id AND r.token_hash = w.token_hash "
    "ORDER BY r.lease_id FOR UPDATE OF r), "
    "renewed AS (UPDATE registry_instances r SET renewals = r.renewals + 1 FROM locked "
    "WHERE r.lease_id = locked.lease_id RETURNING r.lease_id, locked.token_hash, r.renewals, r.ttl_ms) "
    "SELECT lease_id, token_hash, ttl_ms, pg_notify(%s, lease_id || ' ' || renewals || ' ' || ttl_ms) "
    "FROM renewed"
)

Decide = Callable[[StoredInstance | None, int], Change[Any]]
Finish = Callable[[psycopg.AsyncConnection[Any], int, int], Awaitable[None]]
"""(connection, new revision, ``compact_revision`` as read under the revision lock) -> None."""


def stored_from_row(row: Sequence[Any]) -> StoredInstance:
    """A StoredInstance from (token_hash, ttl_ms, probe_passing, data)."""
    token_hash, ttl_ms, probe_passing, data = row
    return StoredInstance(
        instance=registry_pb2.Instance.FromString(bytes(data)),
        token_hash=token_hash,
        ttl_ms=int(ttl_ms),
        probe_passing=bool(probe_passing),
    )


@dataclass(slots=True)
class _Mutation:
    key: tuple[str, str]
    decide: Decide
    future: asyncio.Future[Committed[Any]]


@dataclass(slots=True)
class _Renewal:
    lease_id: str
    token_hash: str
    future: asyncio.Future[int]


@dataclass(slots=True)
class _Plan:
    """A batch's decisions: one outcome per mutation, the statements to send, the events."""

    outcomes: list[Committed[Any] | Exception] = field(default_factory=list)
    statements: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    revisions: list[int] = field(default_factory=list)
    events: list[bytes] = field(default_factory=list)


def plan_batch(
    batch: Sequence[_Mutation], states: dict[tuple[str, str], StoredInstance], revision: int
) -> tuple[_Plan, int]:
    """Run each decision in order on the state the earlier ones left; returns the plan and the revision."""
    plan = _Plan()
    for mutation in batch:
        try:
            change = mutation.decide(states.get(mutation.key), revision + 1)
        except StatusError as exc:  # refused: nothing of this mutation is written
            plan.outcomes.append(exc)
            continue
        _write(plan, mutation.key, change)
        if change.event is not None:
            revision = change.event.revision
            if change.stored is None:
                states.pop(mutation.key, None)
            else:
                states[mutation.key] = change.stored
        plan.outcomes.append(Committed(change.result, revision, change.event))
    return plan, revision


def _write(plan: _Plan, key: tuple[str, str], change: Change[Any]) -> None:
    stored = change.stored
    event = change.event
    if event is None:
        if stored is not None and change.renew:
            plan.statements.append((_RENEW_ROW, (stored.lease_id, RENEW_CHANNEL)))
        return
    if stored is None:
        plan.statements.append(
            ("DELETE FROM registry_instances WHERE service = %s AND instance_id = %s", key)
        )
    else:
        plan.statements.append(
            (
                _UPSERT,
                (
                    *key,
                    stored.lease_id,
                    stored.token_hash,
                    stored.ttl_ms,
                    stored.probe_passing,
                    stored.instance.SerializeToString(),
                    change.renew,
                    RENEW_CHANNEL,
                    change.renew,
                ),
            )
        )
    plan.revisions.append(event.revision)
    plan.events.append(event.to_proto().SerializeToString())


class BatchedWrites:
    """The queues and writer tasks of one node's store (see the module docstring)."""

    def __init__(self, pool: AsyncConnectionPool, finish: Finish, committed: Callable[[], None]) -> None:
        self._pool = pool
        self._finish = finish
        """Records the new revision (and compacts, notifies) inside the batch's transaction."""
        self._committed = committed
        """Called after a batch that wrote events committed (wakes the node's tailer)."""
        self._mutations: list[_Mutation] = []
        self._renewals: list[_Renewal] = []
        self._mutation_wake = asyncio.Event()
        self._renewal_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.transactions = 0
        """Mutation transactions committed by this node (each is one batch)."""
        self.renewal_statements = 0
        """Renewal statements committed by this node (each is one batch)."""

    def start(self) -> None:
        """Start the two writer tasks."""
        self._tasks = [
            start_supervised(self._mutation_loop, name="registry-pg-mutations"),
            start_supervised(self._renewal_loop, name="registry-pg-renewals"),
        ]

    async def stop(self) -> None:
        """Stop the writers and fail what is still queued."""
        await stop_tasks(self._tasks)
        self._tasks = []
        closed = RuntimeError("registry store closed")
        _fail(self._mutations, closed)
        _fail(self._renewals, closed)
        self._mutations.clear()
        self._renewals.clear()

    # -- mutations ---------------------------------------------------------------

    async def mutate(self, service: str, instance_id: str, decide: Decide) -> Committed[Any]:
        """Queue a decision for the next batch and wait until it committed (or was refused)."""
        if not self._tasks:
            raise RuntimeError("registry store is not open")
        future: asyncio.Future[Committed[Any]] = asyncio.get_running_loop().create_future()
        self._mutations.append(_Mutation((service, instance_id), decide, future))
        self._mutation_wake.set()
        return await future

    async def _mutation_loop(self) -> None:
        if self._mutations:  # a restarted loop picks up what an earlier one left queued
            self._mutation_wake.set()
        while True:
            await self._mutation_wake.wait()
            self._mutation_wake.clear()
            while self._mutations:
                batch, self._mutations = self._mutations[:MAX_BATCH], self._mutations[MAX_BATCH:]
                try:
                    await self._commit_mutations(batch)
                except BaseException as exc:  # a bug, or the store closing: nobody is left waiting
                    _fail(batch, exc)
                    raise

    async def _commit_mutations(self, batch: list[_Mutation]) -> None:
        try:
            outcomes = await self._transaction(batch)
        except psycopg.OperationalError as exc:  # outcome unknown (connection): no replay
            _fail(batch, exc)
            return
        except Exception as exc:  # rolled back as a whole: each mutation alone, so a bad one fails alone
            if len(batch) == 1:
                _fail(batch, exc)
                return
            for mutation in batch:
                await self._commit_mutations([mutation])
            return
        for mutation, outcome in zip(batch, outcomes, strict=True):
            if mutation.future.done():
                continue
            if isinstance(outcome, Exception):
                mutation.future.set_exception(outcome)
            else:
                mutation.future.set_result(outcome)

    async def _transaction(self, batch: list[_Mutation]) -> list[Committed[Any] | Exception]:
        keys = list(dict.fromkeys(mutation.key for mutation in batch))
        async with self._pool.connection() as conn:
            # Two round trips: the lock and the rows, then every write and the COMMIT.
            async with conn.pipeline() as pipeline, conn.transaction():
                meta = await conn.execute(
                    "SELECT revision, compact_revision FROM registry_meta WHERE id = 1 FOR UPDATE"
                )
                # READ COMMITTED: this starts once the lock is granted and sees every earlier batch.
                rows = await conn.execute(_LOCK_ROWS, ([k[0] for k in keys], [k[1] for k in keys]))
                await pipeline.sync()
                locked = await meta.fetchone()
                assert locked is not None
                states = {(r[0], r[1]): stored_from_row(r[2:]) for r in await rows.fetchall()}
                plan, revision = plan_batch(batch, states, int(locked[0]))
                for query, params in plan.statements:
                    await conn.execute(query, params)
                if plan.events:
                    await conn.execute(_INSERT_EVENTS, (plan.revisions, plan.events))
                    await self._finish(conn, revision, int(locked[1]))
            self.transactions += 1
        if plan.events:
            self._committed()
        return plan.outcomes

    # -- renewals ----------------------------------------------------------------

    async def renew(self, lease_id: str, lease_token: str) -> int:
        """Queue a renewal for the next batch; returns the lease's TTL in ms."""
        if not self._tasks:
            raise RuntimeError("registry store is not open")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._renewals.append(_Renewal(lease_id, hash_token(lease_token) if lease_token else "", future))
        self._renewal_wake.set()
        return await future

    async def _renewal_loop(self) -> None:
        if self._renewals:
            self._renewal_wake.set()
        while True:
            await self._renewal_wake.wait()
            self._renewal_wake.clear()
            while self._renewals:
                batch, self._renewals = self._renewals[:MAX_BATCH], self._renewals[MAX_BATCH:]
                try:
                    await self._commit_renewals(batch)
                except BaseException as exc:
                    _fail(batch, exc)
                    raise

    async def _commit_renewals(self, batch: list[_Renewal]) -> None:
        try:
            ttls, known = await self._renew_statement(batch)
        except Exception as exc:  # nothing is replayed: a renewal is retried by its client
            _fail(batch, exc)
            return
        for renewal in batch:
            if renewal.future.done():
                continue
            ttl = ttls.get((renewal.lease_id, renewal.token_hash))
            if ttl is not None:
                renewal.future.set_result(ttl)
            elif renewal.lease_id not in known:
                renewal.future.set_exception(
                    NotFoundError(f"lease {renewal.lease_id!r} is unknown or expired; register again")
                )
            else:
                what = "missing" if not renewal.token_hash else "does not match"
                renewal.future.set_exception(
                    PermissionDeniedError(f"lease_token: {what} for lease {renewal.lease_id!r}")
                )

    async def _renew_statement(self, batch: list[_Renewal]) -> tuple[dict[tuple[str, str], int], set[str]]:
        async with self._pool.connection() as conn:
            rows = await (
                await conn.execute(
                    _RENEW_MANY,
                    ([r.lease_id for r in batch], [r.token_hash for r in batch], RENEW_CHANNEL),
                )
            ).fetchall()
            self.renewal_statements += 1
            ttls = {(str(row[0]), str(row[1])): int(row[2]) for row in rows}
            missed = sorted({r.lease_id for r in batch if (r.lease_id, r.token_hash) not in ttls})
            known: set[str] = set()
            if missed:
                found = await (
                    await conn.execute(
                        "SELECT lease_id FROM registry_instances WHERE lease_id = ANY(%s)", (missed,)
                    )
                ).fetchall()
                known = {str(row[0]) for row in found}
        return ttls, known


def _fail(batch: Sequence[_Mutation | _Renewal], error: BaseException) -> None:
    if not isinstance(error, Exception):
        error = RuntimeError("registry store closed")
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)
