"""The SQLite Registry store when one batch commit fails: leases in memory must match the file.

A real SQLite file and the real store; the fault is injected through the store's
connection: one batch, drawn at random over seeded trials, has its COMMIT fail.
Before the fix, leases popped by ``expire_due`` or revoked by a deregistration in
that batch were gone from memory while their instances stayed in the file (they
never expired until a restart), and leases granted by a rolled-back registration
stayed renewable.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Awaitable
from functools import partial
from pathlib import Path
from typing import Any

from google.protobuf import timestamp_pb2
from rpcmesh.v1 import registry_pb2

from rpcmesh.controlplane.registry import transitions
from rpcmesh.controlplane.registry.model import Event, new_id, new_token
from rpcmesh.controlplane.registry.sqlite_store import SqliteRegistryStore
from rpcmesh.controlplane.registry.view import RegistryView
from rpcmesh.errors import NotFoundError, StatusError

SEED = 915
TRIALS = 25
ROUNDS = 24


class _CommitFails:
    """The store's connection, except that COMMIT fails (as on a full disk or an I/O error)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return self._conn.execute(sql, *args)


class _OneCommitFails(SqliteRegistryStore):
    """The real store whose ``fail_at``-th batch fails to commit."""

    def __init__(self, path: Path, *, fail_at: int, clock: Any) -> None:
        super().__init__(path, clock=clock)
        self.fail_at = fail_at
        self.batches = 0
        self.failed = False

    def _run_batch(self, conn: sqlite3.Connection, jobs: list[Any]) -> None:
        self.batches += 1
        if self.batches == self.fail_at:
            self.failed = True
            conn = _CommitFails(conn)  # type: ignore[assignment]
        super()._run_batch(conn, jobs)


def _file_instances(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT instance_id FROM instances")}


def _register(
    store: SqliteRegistryStore, instance_id: str, ttl_ms: int, lease_token: str, fresh: transitions.Fresh
) -> Awaitable[Any]:
    declared = registry_pb2.Instance(service="svc", instance_id=instance_id, address="127.0.0.1:1")
    decide = partial(
        transitions.register, declared=declared, ttl_ms=ttl_ms, lease_token=lease_token, fresh=fresh
    )
    return store.mutate("svc", instance_id, decide)


async def _trial(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    now = [0.0]
    path = tmp_path / f"trial-{seed}" / "registry.db"
    store = _OneCommitFails(path, fail_at=rng.randint(1, ROUNDS // 2), clock=lambda: now[0])
    events: list[Event] = []
    await store.open(events.extend)
    where = f"seed={seed} fail_at={store.fail_at}"
    # instance_id -> (lease_id, lease_token, ttl_ms) of every registration attempted
    attempted: dict[str, tuple[str, str, int]] = {}
    rolled_back: list[str] = []
    try:
        for _ in range(ROUNDS):
            ops: list[Awaitable[Any]] = []
            new: list[str] = []
            ops_of: list[str] = []  # per op: the instance a registration creates, else ""
            stamp = timestamp_pb2.Timestamp()
            stamp.GetCurrentTime()
            for _ in range(rng.randint(1, 4)):
                kind = rng.choice(["register", "register", "update", "deregister", "expire", "renew"])
                known = sorted(attempted)
                if kind == "register" or not known:
                    instance_id = f"i{len(attempted)}-{len(new)}"
                    fresh = transitions.Fresh(lease_id=new_id(), lease_token=new_token(), now=stamp)
                    ttl_ms = rng.randint(500, 3000)
                    attempted[instance_id] = (fresh.lease_id, fresh.lease_token, ttl_ms)
                    new.append(instance_id)
                    ops.append(_register(store, instance_id, ttl_ms, "", fresh))
                    ops_of.append(instance_id)
                    continue
                ops_of.append("")
                instance_id = rng.choice(known)
                lease_id, token, ttl_ms = attempted[instance_id]
                if kind == "update":
                    unused = transitions.Fresh(lease_id=new_id(), lease_token=new_token(), now=stamp)
                    ops.append(_register(store, instance_id, ttl_ms, token, unused))
                elif kind == "deregister":
                    decide = partial(
                        transitions.deregister, service="svc", instance_id=instance_id, lease_token=token
                    )
                    ops.append(store.mutate("svc", instance_id, decide))
                elif kind == "expire":
                    ops.append(store.expire_due())
                else:
                    ops.append(store.renew(lease_id, token))
            results = await asyncio.gather(*ops, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, StatusError | sqlite3.Error):
                    raise result
            for instance_id, result in zip(ops_of, results, strict=True):
                if instance_id and isinstance(result, sqlite3.Error):
                    rolled_back.append(attempted[instance_id][0])
            now[0] += rng.uniform(0.0, 0.8)
        assert store.failed, f"no batch failed ({where}, {store.batches} batches)"
        # The sink saw exactly what the file holds.
        view = RegistryView()
        for event in events:
            view.apply(event)
        assert {i.instance_id for i in view.instances()} == _file_instances(path), where
        # A rolled-back registration holds no lease.
        for lease_id in rolled_back:
            try:
                await store.renew(
                    lease_id, next(t for (l_id, t, _) in attempted.values() if l_id == lease_id)
                )
            except NotFoundError:
                continue
            raise AssertionError(f"the lease of a rolled-back registration renews ({where})")
        # Nobody renews any more: every instance in the file must expire.
        now[0] += 3600
        while await store.expire_due():
            pass
        stuck = _file_instances(path)
        assert not stuck, f"instances that never expire: {sorted(stuck)} ({where})"
    finally:
        await store.close()


async def test_a_failed_batch_commit_leaves_leases_matching_the_file(tmp_path: Path) -> None:
    for trial in range(TRIALS):
        await _trial(tmp_path, SEED + trial)
