"""A PostgreSQL Registry node frozen while the shared log is compacted past it must re-snapshot.

Two real nodes (RegistryNode on PostgresRegistryStore) share one fresh database
with a tiny retained window. Node B runs on an event loop of its own thread,
which the test freezes (blocks) while node A writes more than the window;
when B wakes, the events it missed are gone. Before the fix B logged the gap
and applied past it, so its view stayed wrong for good; now it reloads the
state, and its watches end with OUT_OF_RANGE so their clients take a snapshot.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Coroutine
from functools import partial
from typing import Any, TypeVar

import pytest
from google.protobuf import timestamp_pb2
from rpcmesh.v1 import registry_pb2

from rpcmesh.controlplane.registry import transitions
from rpcmesh.controlplane.registry.model import new_id, new_token
from rpcmesh.controlplane.registry.node import RegistryNode
from rpcmesh.controlplane.registry.postgres_store import PostgresRegistryStore
from rpcmesh.controlplane.registry.settings import RegistrySettings
from rpcmesh.controlplane.registry.watch import Subscription
from rpcmesh.errors import OutOfRangeError

pytestmark = [pytest.mark.backend, pytest.mark.fault]

T = TypeVar("T")
SEED = 3315
TRIALS = 4
RETAIN = 8


def _node(url: str) -> RegistryNode:
    settings = RegistrySettings(retain_events=RETAIN, poll_interval=0.2, probes_enabled=False)
    store = PostgresRegistryStore(url, retain_events=RETAIN, poll_interval=0.2)
    return RegistryNode(store, settings)


class _ThreadNode:
    """A Registry node on an event loop of its own thread, so that the test can freeze it."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="registry-node-b", daemon=True)
        self.thread.start()
        self.node = _node(url)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def freeze(self, until: threading.Event) -> None:
        """Block the node's loop (nothing it does runs) until ``until`` is set."""
        self.loop.call_soon_threadsafe(until.wait)

    def close(self) -> None:
        try:
            self.run(self.node.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


async def _ids(node: RegistryNode) -> set[str]:
    return {instance.instance_id for instance in node.view.instances()}


async def _register(node: RegistryNode, instance_id: str) -> tuple[str, str]:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    fresh = transitions.Fresh(lease_id=new_id(), lease_token=new_token(), now=stamp)
    declared = registry_pb2.Instance(service="gap", instance_id=instance_id, address="127.0.0.1:1")
    decide = partial(transitions.register, declared=declared, ttl_ms=600_000, lease_token="", fresh=fresh)
    await node.mutate("gap", instance_id, decide)
    return instance_id, fresh.lease_token


async def _deregister(node: RegistryNode, instance_id: str, token: str) -> None:
    decide = partial(transitions.deregister, service="gap", instance_id=instance_id, lease_token=token)
    await node.mutate("gap", instance_id, decide)


async def _ended_out_of_range(subscription: Subscription) -> bool:
    try:
        while True:
            await asyncio.wait_for(subscription.next_batch(), 5)
    except OutOfRangeError:
        return True
    except TimeoutError:
        return False


async def test_a_node_behind_a_compacted_log_reloads_and_ends_its_watches(postgres_url: str) -> None:
    node_a = _node(postgres_url)
    await node_a.start()
    node_b = _ThreadNode(postgres_url)
    thaw = threading.Event()
    try:
        node_b.run(node_b.node.start())
        live: dict[str, str] = {}
        counter = 0
        for trial in range(TRIALS):
            seed = SEED + trial
            rng = random.Random(seed)
            for _ in range(rng.randint(1, 4)):
                counter += 1
                instance_id, token = await _register(node_a, f"i{counter}")
                live[instance_id] = token
            deadline = time.monotonic() + 15
            while node_b.run(_ids(node_b.node)) != await _ids(node_a):
                assert time.monotonic() < deadline, f"node B did not catch up before the freeze (seed={seed})"
                await asyncio.sleep(0.05)
            subscription = node_b.run(_subscribe(node_b.node))
            await asyncio.sleep(rng.uniform(0.0, 0.3))  # B freezes at a random point of its polling
            thaw.clear()
            node_b.freeze(thaw)
            # While B is frozen: deletes and registrations it must learn of, then enough churn that
            # the log is compacted past everything B applied.
            gone = rng.sample(sorted(live), rng.randint(1, len(live)))
            for instance_id in gone:
                await _deregister(node_a, instance_id, live.pop(instance_id))
            for _ in range(rng.randint(1, 3)):
                counter += 1
                instance_id, token = await _register(node_a, f"i{counter}")
                live[instance_id] = token
            for _ in range(rng.randint(RETAIN, 2 * RETAIN)):
                counter += 1
                churned, token = await _register(node_a, f"c{counter}")
                await _deregister(node_a, churned, token)
            where = f"seed={seed} trial={trial} deregistered={len(gone)} live={len(live)}"
            thaw.set()
            deadline = time.monotonic() + 15
            while (seen := node_b.run(_ids(node_b.node))) != set(live):
                assert time.monotonic() < deadline, (
                    f"node B's view {sorted(seen)} != {sorted(live)} ({where})"
                )
                await asyncio.sleep(0.05)
            assert await _ids(node_a) == set(live), where
            assert node_b.run(_ended_out_of_range(subscription)), f"B's watch was not ended ({where})"
    finally:
        thaw.set()
        node_b.close()
        await node_a.stop()


async def _subscribe(node: RegistryNode) -> Subscription:
    return node.hub.subscribe("gap")
