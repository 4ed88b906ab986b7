"""Steps go through rpcmesh's client stack: discovery, balancing, dead instances, unsent attempts."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

import grpc.aio
from google.protobuf import wrappers_pb2
from rpcmesh.v1 import saga_pb2 as pb
from rpcmesh.v1 import saga_pb2_grpc

from tests.integration.saga.conftest import PARTICIPANT, Mesh, step
from tests.integration.saga.test_saga_coordinator import payload, wait_terminal
from tests.support.processes import ManagedProcess, python_env


def start_participant(mesh: Mesh, service: str, db: Path) -> ManagedProcess:
    proc = ManagedProcess(
        [sys.executable, str(PARTICIPANT), "--registry", mesh.address, "--service", service, "--db", str(db)],
        env=python_env(),
    )
    mesh.processes.append(proc)
    proc.wait_for_line("registered")
    return proc


def executed(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT saga_id FROM calls WHERE method = 'Do'")]


def one_step(name: str, service: str) -> pb.SagaDefinition:
    return pb.SagaDefinition(name=name, steps=[step("only", service, attempts=1)])


async def test_a_step_waits_for_a_participant_that_is_not_registered_yet(mesh: Mesh, tmp_path: Path) -> None:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        started = await stub.StartSaga(
            pb.StartSagaRequest(definition=one_step("late", "ledger-late"), input=payload("x"))
        )
        saga_id = started.saga.saga_id
        deadline = asyncio.get_running_loop().time() + 30
        while True:  # max_attempts=1, yet unsent attempts (no instance) keep it running
            saga = (await stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id))).saga
            assert saga.state == pb.SAGA_STATE_RUNNING, saga
            if saga.steps[0].attempts >= 3:
                break
            assert asyncio.get_running_loop().time() < deadline, saga
            await asyncio.sleep(0.05)
        assert "UNAVAILABLE" in saga.steps[0].error
        start_participant(mesh, "ledger-late", tmp_path / "late.db")
        saga = await wait_terminal(stub, saga_id)
        assert saga.state == pb.SAGA_STATE_COMPLETED, saga
        result = wrappers_pb2.StringValue.FromString(saga.steps[0].result).value
        assert result == "ledger-late:x"


async def test_steps_are_balanced_and_a_dead_instance_costs_no_attempt(mesh: Mesh, tmp_path: Path) -> None:
    dbs = [tmp_path / "pool-1.db", tmp_path / "pool-2.db"]
    procs = [start_participant(mesh, "ledger-pool", db) for db in dbs]
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        definition = one_step("pool", "ledger-pool")
        await stub.RegisterDefinition(pb.RegisterDefinitionRequest(definition=definition))

        async def run(count: int, prefix: str) -> list[pb.Saga]:
            started = [
                await stub.StartSaga(
                    pb.StartSagaRequest(definition_name="pool", input=payload(f"{prefix}-{i}"))
                )
                for i in range(count)
            ]
            return [await wait_terminal(stub, s.saga.saga_id) for s in started]

        first = await run(10, "before")
        assert all(s.state == pb.SAGA_STATE_COMPLETED for s in first)
        assert all(executed(db) for db in dbs)  # round robin reached both instances

        procs[0].kill()  # still registered (its lease lasts 60 s), but refuses connections
        calls_before = len(executed(dbs[1]))
        after = await run(10, "after")
        assert all(s.state == pb.SAGA_STATE_COMPLETED for s in after), after
        assert all(s.steps[0].attempts == 1 for s in after)  # max_attempts=1 and none was spent
        assert len(executed(dbs[1])) == calls_before + 10
