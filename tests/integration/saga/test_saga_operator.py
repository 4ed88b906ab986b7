"""RetryCompensation and ResolveSaga: the way out of FAILED_COMPENSATION, on SQLite and on PostgreSQL.

Real `rpcmesh up` processes with bearer tokens (development mode over plaintext) and a policy:
``ops`` may act on ``fix-*`` sagas, ``outsider`` on ``other-*`` sagas only. One participant
process serves ``ledger-a``; its ``UndoOnceFixed`` compensation fails (FAILED_PRECONDITION, not
retried) while a marker file exists, so a saga ends FAILED_COMPENSATION; removing the file is
"fixing the participant". On PostgreSQL two nodes share the store: node ``a`` drives the sagas and
every operator verb is sent to node ``b``, which does not drive (it records the request in the
saga's stream, the driving node acts on it). The last test of each store kills the driving node
right after RetryCompensation was acknowledged: the saga still ends COMPENSATED.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import psycopg
import pytest
from google.protobuf import duration_pb2
from rpcmesh.v1 import saga_pb2 as pb
from rpcmesh.v1 import saga_pb2_grpc

from rpcmesh.controlplane.saga.ownership import SAGA_LEADER_LOCK
from rpcmesh.security.client import ClientSecurity, aio_channel
from rpcmesh.security.tokens import mint_token
from tests.integration.saga.conftest import PARTICIPANT, step
from tests.integration.saga.test_saga_coordinator import payload
from tests.support import backends
from tests.support.processes import ManagedProcess, python_env, rpcmesh_command, start_control_plane

SECRET = b"saga-operator-secret-0123456789abcdef"
POLICY = """\
identities:
  ops:
    sagas: ["fix-*"]
    calls: [ledger-a]
  outsider:
    sagas: ["other-*"]
  ledger-a: {}
  rpcmesh-coordinator: {}
"""
TIMEOUT = 10.0


def _token(subject: str) -> str:
    return mint_token(SECRET, subject=subject, issuer="rpcmesh", ttl=600)


@dataclass
class Plane:
    """``leader`` drives the sagas; operator verbs go to ``follower`` (the same node on SQLite)."""

    mode: str
    folder: Path
    args: list[str]
    nodes: dict[str, tuple[ManagedProcess, str]]
    ledger_db: Path
    processes: list[ManagedProcess] = field(default_factory=list)

    @property
    def leader(self) -> str:
        return self.nodes["a"][1]

    @property
    def follower(self) -> str:
        return self.nodes["b" if "b" in self.nodes else "a"][1]

    def break_participant(self) -> None:
        self.ledger_db.with_suffix(".broken").touch()

    def fix_participant(self) -> None:
        self.ledger_db.with_suffix(".broken").unlink(missing_ok=True)

    def effects(self, saga_id: str) -> dict[str, tuple[int, int]]:
        with sqlite3.connect(self.ledger_db) as conn:
            rows = conn.execute(
                "SELECT step, applied, undone FROM effects WHERE saga_id = ?", (saga_id,)
            ).fetchall()
        return {row[0]: (row[1], row[2]) for row in rows}

    def compensation_keys(self, saga_id: str) -> list[str]:
        with sqlite3.connect(self.ledger_db) as conn:
            rows = conn.execute(
                "SELECT key FROM calls WHERE saga_id = ? AND step = 'reserve' "
                "AND method IN ('UndoBroken', 'Undo')",
                (saga_id,),
            ).fetchall()
        return [row[0] for row in rows]


def _held(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid::bigint = %s",
            (SAGA_LEADER_LOCK,),
        ).fetchone()
    return row is not None


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def plane(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    folder = tmp_path_factory.mktemp(f"saga-operator-{request.param}")
    (folder / "token.secret").write_bytes(SECRET)
    (folder / "policy.yaml").write_text(POLICY)
    args = ["--token-secret-file", str(folder / "token.secret"), "--policy", str(folder / "policy.yaml")]
    args.append("--insecure")
    with backends.fresh_postgres_database() if request.param == "postgres" else nullcontext("") as url:
        if url:
            args += ["--store", url]
        nodes: dict[str, tuple[ManagedProcess, str]] = {}
        world = Plane(request.param, folder, args, nodes, folder / "ledger-a.db")
        try:
            nodes["a"] = start_control_plane(folder / "a", *args)
            world.processes.append(nodes["a"][0])
            if url:
                deadline = time.monotonic() + 30
                while not _held(url):  # a takes the lock first: it drives
                    assert time.monotonic() < deadline, "no node took the saga leader lock"
                    time.sleep(0.05)
                nodes["b"] = start_control_plane(folder / "b", *args)
                world.processes.append(nodes["b"][0])
            participant = ManagedProcess(
                [
                    sys.executable,
                    str(PARTICIPANT),
                    "--registry",
                    world.follower,  # the node that survives the crash test
                    "--service",
                    "ledger-a",
                    "--db",
                    str(world.ledger_db),
                ],
                env=python_env({"RPCMESH_TOKEN": _token("ledger-a")}),
            )
            world.processes.append(participant)
            participant.wait_for_line("registered")
            yield world
        finally:
            for proc in world.processes:
                proc.kill()


@asynccontextmanager
async def coordinator(
    address: str, identity: str = "ops"
) -> AsyncIterator[saga_pb2_grpc.SagaCoordinatorStub]:
    async with aio_channel(address, ClientSecurity(token=_token(identity), insecure=True)) as channel:
        yield saga_pb2_grpc.SagaCoordinatorStub(channel)


def broken_definition(name: str) -> pb.SagaDefinition:
    """Steps reserve (compensated by UndoOnceFixed), charge (Undo), ship (always fails)."""
    definition = pb.SagaDefinition(
        name=name,
        steps=[
            step("reserve", "ledger-a"),
            step("charge", "ledger-a"),
            step("ship", "ledger-a", "Fail", compensate=False),
        ],
    )
    definition.steps[0].compensation_method = "/test.v1.Ledger/UndoOnceFixed"
    return definition


async def wait_state(
    stub: saga_pb2_grpc.SagaCoordinatorStub, saga_id: str, states: set[int], limit: float = 30
) -> pb.Saga:
    deadline = time.monotonic() + limit
    while True:
        request = pb.GetSagaRequest(saga_id=saga_id, wait=duration_pb2.Duration(seconds=2))
        saga = (await stub.GetSaga(request, timeout=TIMEOUT)).saga
        if saga.state in states:
            return saga
        assert time.monotonic() < deadline, saga
        await asyncio.sleep(0.05)


async def failed_saga(plane: Plane, name: str) -> str:
    """A saga (started through the driving node) in FAILED_COMPENSATION, seen by the follower too."""
    plane.break_participant()
    async with coordinator(plane.leader) as leader, coordinator(plane.follower) as follower:
        started = await leader.StartSaga(
            pb.StartSagaRequest(definition=broken_definition(name), input=payload(name)), timeout=TIMEOUT
        )
        saga_id = started.saga.saga_id
        saga = await wait_state(follower, saga_id, {pb.SAGA_STATE_FAILED_COMPENSATION})
    assert [s.state for s in saga.steps] == [
        pb.STEP_STATE_COMPENSATION_FAILED,
        pb.STEP_STATE_COMPENSATED,
        pb.STEP_STATE_FAILED,
    ], saga
    return saga_id


async def expect(code: grpc.StatusCode, call: object, field_name: str = "") -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value
    assert field_name in (caught.value.details() or ""), caught.value.details()


async def test_retry_after_fixing_the_participant_compensates_each_step_once(plane: Plane) -> None:
    saga_id = await failed_saga(plane, "fix-retry")
    async with coordinator(plane.follower) as stub, coordinator(plane.follower, "outsider") as outsider:
        # Bad input and a caller not allowed the saga's definition change nothing.
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT, stub.RetryCompensation(pb.RetryCompensationRequest()), "saga_id"
        )
        await expect(
            grpc.StatusCode.NOT_FOUND,
            stub.RetryCompensation(pb.RetryCompensationRequest(saga_id="0" * 32), timeout=TIMEOUT),
            "saga_id",
        )
        await expect(
            grpc.StatusCode.PERMISSION_DENIED,
            outsider.RetryCompensation(pb.RetryCompensationRequest(saga_id=saga_id), timeout=TIMEOUT),
        )
        # Still broken: a retry fails again, with a fresh budget (one more attempt, not refused).
        retried = await stub.RetryCompensation(
            pb.RetryCompensationRequest(saga_id=saga_id, reason="first try"), timeout=TIMEOUT
        )
        assert retried.saga.state == pb.SAGA_STATE_COMPENSATING
        saga = await wait_state(stub, saga_id, {pb.SAGA_STATE_FAILED_COMPENSATION})
        assert saga.steps[0].compensation_attempts == 2
        plane.fix_participant()
        retried = await stub.RetryCompensation(
            pb.RetryCompensationRequest(saga_id=saga_id, reason="ledger fixed, INC-7"), timeout=TIMEOUT
        )
        assert retried.saga.state == pb.SAGA_STATE_COMPENSATING
        saga = await wait_state(stub, saga_id, {pb.SAGA_STATE_COMPENSATED})
        await expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.RetryCompensation(pb.RetryCompensationRequest(saga_id=saga_id), timeout=TIMEOUT),
            "saga_id",
        )
    assert [s.state for s in saga.steps] == [
        pb.STEP_STATE_COMPENSATED,
        pb.STEP_STATE_COMPENSATED,
        pb.STEP_STATE_FAILED,
    ]
    assert saga.steps[0].compensation_attempts == 3 and saga.steps[1].compensation_attempts == 1
    assert [(a.kind, a.identity, a.reason, a.step) for a in saga.operator_actions] == [
        ("retry_compensation", "ops", "first try", "reserve"),
        ("retry_compensation", "ops", "ledger fixed, INC-7", "reserve"),
    ]
    assert all(a.time.seconds > 0 for a in saga.operator_actions)
    assert saga.ended_at.ToNanoseconds() >= saga.operator_actions[-1].time.ToNanoseconds()
    assert plane.effects(saga_id) == {"reserve": (1, 1), "charge": (1, 1)}
    # Every compensation call of the step, before and after the fix, carried the same key.
    assert set(plane.compensation_keys(saga_id)) == {f"{saga_id}/reserve/compensate"}


async def test_resolve_records_the_reason_and_ends_the_saga(plane: Plane) -> None:
    saga_id = await failed_saga(plane, "fix-resolve")
    async with coordinator(plane.follower) as stub, coordinator(plane.follower, "outsider") as outsider:
        for reason in ("", "   "):
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                stub.ResolveSaga(pb.ResolveSagaRequest(saga_id=saga_id, reason=reason), timeout=TIMEOUT),
                "reason",
            )
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.ResolveSaga(pb.ResolveSagaRequest(saga_id=saga_id, reason="x" * 1025), timeout=TIMEOUT),
            "reason",
        )
        await expect(
            grpc.StatusCode.NOT_FOUND,
            stub.ResolveSaga(pb.ResolveSagaRequest(saga_id="0" * 32, reason="r"), timeout=TIMEOUT),
            "saga_id",
        )
        await expect(
            grpc.StatusCode.PERMISSION_DENIED,
            outsider.ResolveSaga(pb.ResolveSagaRequest(saga_id=saga_id, reason="mine"), timeout=TIMEOUT),
        )
        unchanged = (await stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=TIMEOUT)).saga
        assert unchanged.state == pb.SAGA_STATE_FAILED_COMPENSATION and not unchanged.operator_actions
        resolved = await stub.ResolveSaga(
            pb.ResolveSagaRequest(saga_id=saga_id, reason="refunded by hand, ticket 123"), timeout=TIMEOUT
        )
        assert resolved.saga.state == pb.SAGA_STATE_RESOLVED_MANUALLY
        [action] = resolved.saga.operator_actions
        assert (action.kind, action.identity, action.reason) == (
            "resolve",
            "ops",
            "refunded by hand, ticket 123",
        )
        for verb in (
            stub.ResolveSaga(pb.ResolveSagaRequest(saga_id=saga_id, reason="again"), timeout=TIMEOUT),
            stub.RetryCompensation(pb.RetryCompensationRequest(saga_id=saga_id), timeout=TIMEOUT),
            stub.AbortSaga(pb.AbortSagaRequest(saga_id=saga_id), timeout=TIMEOUT),
        ):
            await expect(grpc.StatusCode.FAILED_PRECONDITION, verb)
    async with coordinator(plane.leader) as leader:
        # The driving node knows it too, and runs nothing for it.
        saga = await wait_state(leader, saga_id, {pb.SAGA_STATE_RESOLVED_MANUALLY})
        watched = [
            r.transition
            async for r in leader.WatchSaga(pb.WatchSagaRequest(saga_id=saga_id), timeout=TIMEOUT)
        ]
    assert watched[-1].kind == "saga_resolved" and watched[-1].detail == "refunded by hand, ticket 123"
    assert saga.ended_at.ToNanoseconds() > 0
    plane.fix_participant()
    await asyncio.sleep(0.3)
    assert plane.effects(saga_id) == {"reserve": (1, 0), "charge": (1, 1)}


async def test_a_saga_in_another_state_is_refused(plane: Plane) -> None:
    async with coordinator(plane.follower) as stub:
        definition = pb.SagaDefinition(name="fix-ok", steps=[step("reserve", "ledger-a", compensate=False)])
        started = await stub.StartSaga(
            pb.StartSagaRequest(
                definition=definition, input=payload("ok"), wait=duration_pb2.Duration(seconds=5)
            ),
            timeout=TIMEOUT,
        )
        saga = await wait_state(stub, started.saga.saga_id, {pb.SAGA_STATE_COMPLETED})
        for verb in (
            stub.RetryCompensation(pb.RetryCompensationRequest(saga_id=saga.saga_id), timeout=TIMEOUT),
            stub.ResolveSaga(pb.ResolveSagaRequest(saga_id=saga.saga_id, reason="r"), timeout=TIMEOUT),
        ):
            await expect(grpc.StatusCode.FAILED_PRECONDITION, verb, "SAGA_STATE_COMPLETED")
        after = (await stub.GetSaga(pb.GetSagaRequest(saga_id=saga.saga_id), timeout=TIMEOUT)).saga
    assert after == saga


@pytest.mark.parametrize("plane", ["sqlite"], indirect=True)  # the CLI is the same against either store
async def test_cli_retry_compensation_and_resolve(plane: Plane) -> None:
    retry_id = await failed_saga(plane, "fix-cli-retry")
    resolve_id = await failed_saga(plane, "fix-cli-resolve")
    plane.fix_participant()
    env = python_env({"RPCMESH_TOKEN": _token("ops"), "RPCMESH_INSECURE": "1"})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = rpcmesh_command("saga", *args, "--target", plane.follower)
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)

    retried = cli("retry-compensation", retry_id, "--reason", "ledger fixed", "--wait", "30")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.split("\t")[1].strip() == "COMPENSATED"
    again = cli("retry-compensation", retry_id)
    assert again.returncode == 1 and again.stderr.startswith(
        "rpcmesh saga retry-compensation: FAILED_PRECONDITION"
    )
    assert cli("resolve", resolve_id).returncode == 2  # --reason is required
    assert cli("resolve", resolve_id, "--reason", " ").returncode != 0
    resolved = cli("resolve", resolve_id, "--reason", "refunded by hand")
    assert resolved.returncode == 0, resolved.stderr
    assert resolved.stdout.split("\t")[1].strip() == "RESOLVED_MANUALLY"
    status = cli("status", resolve_id)
    assert "resolve by ops: refunded by hand" in status.stdout, status.stdout
    listed = cli("list", "--state", "RESOLVED_MANUALLY", "--definition", "fix-cli-resolve", "--json")
    assert [s["saga_id"] for s in json.loads(listed.stdout)["sagas"]] == [resolve_id]


async def test_driving_node_killed_after_retry_was_acknowledged_still_compensates(plane: Plane) -> None:
    """Last in the module: it kills the driving node (restarted on SQLite; on PostgreSQL ``b`` takes over)."""
    saga_id = await failed_saga(plane, "fix-crash")
    plane.fix_participant()
    slow = plane.ledger_db.with_suffix(".slow")
    slow.touch()  # the fixed compensation takes a second: the kill lands before its outcome is recorded
    try:
        async with coordinator(plane.follower) as stub:
            retried = await stub.RetryCompensation(
                pb.RetryCompensationRequest(saga_id=saga_id), timeout=TIMEOUT
            )
        plane.nodes["a"][0].signal(signal.SIGKILL)
    finally:
        slow.unlink()
    assert retried.saga.state == pb.SAGA_STATE_COMPENSATING
    if plane.mode == "sqlite":
        port = int(plane.leader.rsplit(":", 1)[1])
        plane.nodes["a"][0].kill()
        plane.nodes["a"] = start_control_plane(plane.folder / "a", *plane.args, port=port)
        plane.processes.append(plane.nodes["a"][0])
    async with coordinator(plane.follower) as stub:
        saga = await wait_state(stub, saga_id, {pb.SAGA_STATE_COMPENSATED}, limit=60)
    assert [s.state for s in saga.steps][:2] == [pb.STEP_STATE_COMPENSATED] * 2
    # 1: failed, 2: in flight at the kill (when the runner got that far), then the resumed one.
    assert saga.steps[0].compensation_attempts in (2, 3), saga
    print(f"{plane.mode}: reserve compensated after {saga.steps[0].compensation_attempts} attempts")
    assert plane.effects(saga_id) == {"reserve": (1, 1), "charge": (1, 1)}
