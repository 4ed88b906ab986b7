"""PostgreSQL Registry: queued writes commit in batches, with the semantics of one write at a time.

A real RegistryNode on PostgresRegistryStore and a fresh database. Concurrent
mutations share transactions, keep revisions consecutive and in order, see the
earlier members of their batch, and a refused one fails alone. Concurrent
renewals share statements, each caller gets its own answer (TTL, NOT_FOUND or
PERMISSION_DENIED), and every renewed lease keeps living while an unrenewed one
expires. Before batching, every mutation and every renewal was its own commit
(and the store had no ``writes``).
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

import psycopg
import pytest
from google.protobuf import timestamp_pb2
from rpcmesh.v1 import registry_pb2

from rpcmesh.controlplane.registry import transitions
from rpcmesh.controlplane.registry.model import Committed, new_id, new_token
from rpcmesh.controlplane.registry.node import RegistryNode
from rpcmesh.controlplane.registry.postgres_store import PostgresRegistryStore
from rpcmesh.controlplane.registry.postgres_writes import BatchedWrites
from rpcmesh.controlplane.registry.settings import RegistrySettings
from rpcmesh.errors import NotFoundError, PermissionDeniedError

pytestmark = [pytest.mark.backend]

SERVICE = "batched"


def _fresh() -> transitions.Fresh:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return transitions.Fresh(lease_id=new_id(), lease_token=new_token(), now=stamp)


def _register(instance_id: str, ttl_ms: int, token: str = "", address: str = "127.0.0.1:1") -> Any:
    declared = registry_pb2.Instance(service=SERVICE, instance_id=instance_id, address=address)
    return partial(transitions.register, declared=declared, ttl_ms=ttl_ms, lease_token=token, fresh=_fresh())


def _writes(node: RegistryNode) -> BatchedWrites:
    store = node.store
    assert isinstance(store, PostgresRegistryStore) and store.writes is not None
    return store.writes


async def _node(url: str) -> RegistryNode:
    settings = RegistrySettings(probes_enabled=False)
    node = RegistryNode(PostgresRegistryStore(url, expiry_interval=0.1), settings)
    await node.start()
    return node


async def _wait_for(condition: Any, what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_concurrent_mutations_share_transactions_and_keep_revisions_in_order(postgres_url: str) -> None:
    node = await _node(postgres_url)
    try:
        first = await node.mutate(SERVICE, "seed", _register("seed", 600_000))
        token = first.result.lease_token
        before = _writes(node).transactions
        count = 40
        calls = [node.mutate(SERVICE, f"i{i}", _register(f"i{i}", 600_000)) for i in range(count)]
        # In the same batch: an update of "seed" (its token), one with a wrong token (refused
        # alone), then a deregistration of "seed" that must see the update before it.
        calls.append(node.mutate(SERVICE, "seed", _register("seed", 600_000, token, address="127.0.0.1:2")))
        calls.append(node.mutate(SERVICE, "seed", _register("seed", 600_000, "wrong")))
        calls.append(
            node.mutate(
                SERVICE,
                "seed",
                partial(transitions.deregister, service=SERVICE, instance_id="seed", lease_token=token),
            )
        )
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[count + 1], PermissionDeniedError), results[count + 1]
        committed = [r for i, r in enumerate(results) if i != count + 1]
        assert all(isinstance(r, Committed) and r.event is not None for r in committed), committed
        revisions = [r.event.revision for r in committed if isinstance(r, Committed) and r.event is not None]
        # In arrival order, consecutive, after the seed's revision; each answer carries its own.
        assert revisions == list(range(first.revision + 1, first.revision + 1 + len(committed)))
        assert all(isinstance(r, Committed) and r.revision == r.event.revision for r in committed)  # type: ignore[union-attr]
        update, removal = committed[count], committed[count + 1]
        assert isinstance(update, Committed) and update.event is not None
        assert update.event.instance.address == "127.0.0.1:2"
        assert isinstance(removal, Committed) and removal.event is not None
        assert removal.event.instance.address == "127.0.0.1:2"  # the deregistration saw the update
        assert _writes(node).transactions - before < count  # one per mutation before batching
        await _wait_for(lambda: node.view.revision == revisions[-1], "the view to apply every event")
        assert {i.instance_id for i in node.view.instances()} == {f"i{i}" for i in range(count)}
        with psycopg.connect(postgres_url) as conn:
            stored = conn.execute("SELECT revision FROM registry_events ORDER BY revision").fetchall()
            meta = conn.execute("SELECT revision FROM registry_meta").fetchone()
        assert [row[0] for row in stored] == list(range(1, revisions[-1] + 1))  # gap-free
        assert meta is not None and meta[0] == revisions[-1]
    finally:
        await node.stop()


async def test_batched_renewals_answer_each_caller_and_keep_each_lease_alive(postgres_url: str) -> None:
    node = await _node(postgres_url)
    try:
        ttl_ms = 2_000
        registered = {}
        for name in ("kept-a", "kept-b", "dropped"):
            committed = await node.mutate(SERVICE, name, _register(name, ttl_ms))
            registered[name] = committed.result
        await _wait_for(lambda: node.store.is_leader, "this node to lead expiry")
        a, b = registered["kept-a"], registered["kept-b"]
        before = _writes(node).renewal_statements
        renewals = 0
        began = time.monotonic()
        # Renew a and b (a twice per batch) for 2.5 TTLs; "dropped" is never renewed.
        while "dropped" in {
            i.instance_id for i in node.view.instances()
        } or time.monotonic() - began < 2.5 * (ttl_ms / 1000):
            assert time.monotonic() - began < 30, "the unrenewed lease never expired"
            answers = await asyncio.gather(
                node.store.renew(a.lease_id, a.lease_token),
                node.store.renew(b.lease_id, b.lease_token),
                node.store.renew(a.lease_id, a.lease_token),
                node.store.renew(b.lease_id, "not-the-token"),
                node.store.renew(b.lease_id, ""),
                node.store.renew("no-such-lease", a.lease_token),
                return_exceptions=True,
            )
            renewals += len(answers)
            assert answers[:3] == [ttl_ms] * 3, answers
            assert isinstance(answers[3], PermissionDeniedError) and "does not match" in str(answers[3])
            assert isinstance(answers[4], PermissionDeniedError) and "missing" in str(answers[4])
            assert isinstance(answers[5], NotFoundError), answers[5]
            await asyncio.sleep(0.2)
        assert {i.instance_id for i in node.view.instances()} == {"kept-a", "kept-b"}
        assert _writes(node).renewal_statements - before < renewals  # one per renewal before batching
        with psycopg.connect(postgres_url) as conn:
            rows = conn.execute(
                "SELECT instance_id, renewals FROM registry_instances ORDER BY instance_id"
            ).fetchall()
        # Each batch bumps a lease once, however often it is in the batch; the registration counts one.
        assert [row[0] for row in rows] == ["kept-a", "kept-b"]
        assert rows[0][1] == rows[1][1] > 1
    finally:
        await node.stop()
