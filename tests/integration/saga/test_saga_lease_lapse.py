"""A saga runner stopped by a lapsed lease is restarted when the lease comes back on the same node.

Found by the partition test bed (issue 21, scripts/partitions_long.py seed 5): the node driving the
sagas was isolated for 2.7 s; its heartbeat on the lock connection stalled past the lease (4 s after
the last answered one) but PostgreSQL kept the lock session (idle for less than 5 s). A saga started
just after the heal had its first step recorded as started; its runner saw the lapsed lease and ended
as if deposed. The node never stepped down, so no node resumed the saga: it stayed RUNNING with no
participant call. Now such a runner is restarted after the next answered heartbeat (the ownership
loop calls ``restart_failed``), as a runner that failed on an error is.

A real SagaEngine on a real SQLite EventStore file, with an in-process participant and a lease that
lapses once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from rpcmesh.v1 import saga_pb2 as pb

from rpcmesh.controlplane.eventstore.sqlite import SqliteEventStorage
from rpcmesh.controlplane.saga.engine import SagaEngine
from rpcmesh.telemetry import DISABLED


class Participant:
    """Answers every step call with its request and counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def invoke(
        self,
        service: str,
        method: str,
        request: bytes,
        *,
        deadline: float,
        metadata: Sequence[tuple[str, str]],
    ) -> bytes:
        self.calls += 1
        return request

    async def close(self) -> None:
        pass


class Lease:
    """Valid, except for the next ``lapses`` checks."""

    def __init__(self) -> None:
        self.lapses = 0
        self.lapsed = asyncio.Event()

    def __call__(self) -> bool:
        if self.lapses > 0:
            self.lapses -= 1
            self.lapsed.set()
            return False
        return True


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SqliteEventStorage]:
    store = SqliteEventStorage(tmp_path / "events.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def definition() -> pb.SagaDefinition:
    steps = [
        pb.SagaStep(
            name=name,
            service=f"svc-{name}",
            method="/test.v1.Ledger/Do",
            no_compensation=True,
            request=pb.PayloadTemplate(base_from="input"),
        )
        for name in ("reserve", "ship")
    ]
    return pb.SagaDefinition(name="lapse", steps=steps)


async def test_a_runner_stopped_by_a_lapsed_lease_is_restarted_while_the_node_still_leads(
    storage: SqliteEventStorage,
) -> None:
    participant = Participant()
    engine = SagaEngine(storage, participant, telemetry=DISABLED)
    await engine.start()
    lease = Lease()
    engine.lease = lease
    try:
        lease.lapses = 1  # the check before the first step's call (its start is already recorded)
        view, created = await engine.start_saga(definition(), b"\x0a\x01x")
        assert created
        await asyncio.wait_for(lease.lapsed.wait(), 10)
        await asyncio.sleep(0.1)  # the runner ends in the same step as the check; let it settle
        stuck = await engine.wait_finished(view.saga_id, 0.1)
        assert not stuck.finished and participant.calls == 0, "the runner stopped on the lapsed lease"

        # The next answered heartbeat on the lock connection (SagaOwnership._beat) does this:
        assert engine.restart_failed() == 1
        done = await engine.wait_finished(view.saga_id, 10)
        assert done.state == pb.SAGA_STATE_COMPLETED
        assert participant.calls == 2
    finally:
        await engine.stop()
