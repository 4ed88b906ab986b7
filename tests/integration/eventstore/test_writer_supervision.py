"""The group-commit writer never strands an append: a failure outside the transaction fails its group.

The fault is injected through the storage's own append signal (raising once, after a commit, at a
seeded point among concurrent appends) on real SQLite and PostgreSQL storages. Before supervision the
writer task died there: the group's callers and every later append waited forever.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rpcmesh.controlplane.eventstore.model import ANY, NewEvent
from rpcmesh.controlplane.eventstore.postgres import PostgresEventStorage
from rpcmesh.controlplane.eventstore.sqlite import SqliteEventStorage

SEED = int(os.environ.get("RPCMESH_FAULT_SEED", random.randrange(1 << 30)))
TRIALS = 3


@pytest.fixture(params=["sqlite", "postgresql"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "sqlite":
        store: Any = SqliteEventStorage(tmp_path / "events.db")
    else:
        store = PostgresEventStorage(request.getfixturevalue("postgres_url"))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


class Injected(RuntimeError):
    pass


async def test_a_writer_failure_fails_its_group_and_the_writer_carries_on(storage: Any) -> None:
    rand = random.Random(SEED)
    signal = storage._signal  # the storage's own append signal: the fault point after a commit
    real_advance = signal.advance
    fired = 0

    def faulty(countdown: list[int], trial: int) -> Any:
        def advance(head: int) -> None:
            countdown[0] -= 1
            if countdown[0] == 0:
                raise Injected(f"trial {trial}")
            real_advance(head)

        return advance

    async def append_later(trial: int, index: int) -> Any:
        await asyncio.sleep(rand.random() * 0.02)  # spread the appends over several groups
        return await storage.append(
            f"s-{trial}-{index}", ANY, [NewEvent(event_id=f"{trial}-{index}", event_type="T")]
        )

    for trial in range(TRIALS):
        countdown = [rand.randrange(1, 3)]
        signal.advance = faulty(countdown, trial)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(append_later(trial, i) for i in range(8)), return_exceptions=True), 10
            )
        except TimeoutError:
            pytest.fail(f"appends stranded by a dead writer (seed {SEED}, trial {trial})")
        signal.advance = real_advance
        failed = [r for r in results if isinstance(r, BaseException)]
        assert all(isinstance(r, Injected) for r in failed), (SEED, trial, results)
        assert bool(failed) == (countdown[0] <= 0), (SEED, trial, results)
        fired += bool(failed)
        # The writer is back: a later append commits.
        after = await asyncio.wait_for(
            storage.append(f"after-{trial}", ANY, [NewEvent(event_id=f"a{trial}", event_type="T")]), 10
        )
        assert after.appended == 1, (SEED, trial)
    assert fired, f"the fault never fired (seed {SEED})"
