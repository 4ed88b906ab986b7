"""The Registry's lease-expiry loop is supervised: an unexpected error is logged and the loop restarts.

A real SQLite store whose ``seconds_to_next_expiry`` raises once, at a call drawn
from a seeded generator. Before, that exception ended the expiry task for good
and no lease expired again until a restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from functools import partial
from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2
from rpcmesh.v1 import registry_pb2

from rpcmesh.controlplane.registry import transitions
from rpcmesh.controlplane.registry.model import new_id, new_token
from rpcmesh.controlplane.registry.node import RegistryNode
from rpcmesh.controlplane.registry.settings import RegistrySettings
from rpcmesh.controlplane.registry.sqlite_store import SqliteRegistryStore

SEED = 77
TRIALS = 3


class _FailsOnce(SqliteRegistryStore):
    """The real store, whose ``fail_at``-th ``seconds_to_next_expiry`` call raises (a bug's stand-in)."""

    def __init__(self, path: Path, fail_at: int) -> None:
        super().__init__(path)
        self.fail_at = fail_at
        self.calls = 0

    def seconds_to_next_expiry(self) -> float:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("unexpected (injected)")
        return super().seconds_to_next_expiry()


async def test_expiry_loop_survives_an_unexpected_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for trial in range(TRIALS):
        seed = SEED + trial
        rng = random.Random(seed)
        store = _FailsOnce(tmp_path / f"t{trial}" / "registry.db", fail_at=rng.randint(1, 4))
        node = RegistryNode(store, RegistrySettings(expiry_check_interval=0.05, probes_enabled=False))
        caplog.clear()
        await node.start()
        try:
            stamp = timestamp_pb2.Timestamp()
            stamp.GetCurrentTime()
            fresh = transitions.Fresh(lease_id=new_id(), lease_token=new_token(), now=stamp)
            declared = registry_pb2.Instance(service="sup", instance_id="x", address="127.0.0.1:1")
            ttl_ms = rng.randint(200, 500)
            decide = partial(
                transitions.register, declared=declared, ttl_ms=ttl_ms, lease_token="", fresh=fresh
            )
            await node.mutate("sup", "x", decide)
            registered_at = time.monotonic()
            while node.view.get("sup", "x") is not None:
                assert time.monotonic() - registered_at < 10, f"the lease never expired (seed={seed})"
                await asyncio.sleep(0.05)
            assert store.calls > store.fail_at, f"the fault was not injected (seed={seed})"
            assert any(
                r.levelno == logging.ERROR and "registry-expiry" in r.getMessage() for r in caplog.records
            ), f"the failure was not logged at ERROR (seed={seed})"
        finally:
            await node.stop()
