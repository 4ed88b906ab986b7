"""The rolling-restart soak, compact: the example shop under traffic while its control plane restarts.

Embedded: one `rpcmesh up` on SQLite, stopped 10 times at random moments, SIGTERM and
kill -9 alternating. Scale-out: two nodes on PostgreSQL + NATS JetStream, stopped
alternately 10 times (RPCMESH_SOAK_RESTARTS changes the number). The invariants are listed
in ``harness.py``; a failure prints the seed and the schedule, and ``RPCMESH_SOAK_SEED=<seed>``
replays that schedule. The longer version is ``scripts/soak.py``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.integration.soak.harness import SoakConfig, run_soak
from tests.support.backends import fresh_postgres_database, nats_url

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(300)]

RESTARTS = int(os.environ.get("RPCMESH_SOAK_RESTARTS", "10"))


def soak_seed() -> int:
    """A fresh seed per run (so `make test` keeps exploring), or the one to replay."""
    chosen = os.environ.get("RPCMESH_SOAK_SEED")
    return int(chosen) if chosen else random.SystemRandom().randrange(1, 2**31)


async def test_embedded_control_plane_restarted_under_traffic(tmp_path: Path) -> None:
    config = SoakConfig(mode="embedded", seed=soak_seed(), restarts=RESTARTS)
    result = await run_soak(config, tmp_path)
    print(result.summary())
    assert not result.violations, result.failure_message()


@pytest.mark.backend
async def test_two_nodes_on_postgres_and_nats_restarted_alternately_under_traffic(tmp_path: Path) -> None:
    bus = nats_url()
    with fresh_postgres_database() as store:
        config = SoakConfig(mode="scale-out", seed=soak_seed(), restarts=RESTARTS, store=store, bus=bus)
        result = await run_soak(config, tmp_path)
    print(result.summary())
    assert not result.violations, result.failure_message()
