"""Two `rpcmesh up` nodes on one PostgreSQL store: one drives the sagas, both serve, the survivor takes over.

Real processes throughout: two control planes on a fresh database, three
participant processes recording every invocation and effect (registered
through the node that survives, so discovery keeps working after the kill).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import psycopg
import pytest
from google.protobuf import wrappers_pb2
from rpcmesh.v1 import saga_pb2 as pb
from rpcmesh.v1 import saga_pb2_grpc

from rpcmesh.controlplane.saga.ownership import SAGA_LEADER_LOCK
from tests.integration.saga.conftest import (
    SERVICES,
    Mesh,
    ok_and_failing_definitions,
    start_participants,
    step,
)
from tests.support.processes import ManagedProcess, start_control_plane

FINAL = (pb.SAGA_STATE_COMPLETED, pb.SAGA_STATE_COMPENSATED)
TERMINAL = (*FINAL, pb.SAGA_STATE_ABORTED, pb.SAGA_STATE_FAILED_COMPENSATION)


@dataclass
class Cluster:
    """Node ``a`` leads (it took the lock before ``b`` started); participants register through ``b``."""

    url: str
    a: ManagedProcess
    a_address: str
    b: ManagedProcess
    b_address: str
    world: Mesh
    processes: list[ManagedProcess] = field(default_factory=list)


def definitions() -> list[pb.SagaDefinition]:
    return list(ok_and_failing_definitions())


def slow_definition(backoff_ms: int = 500) -> pb.SagaDefinition:
    """reserve, then a step failing every ``backoff_ms`` (FAILED_PRECONDITION retried) until aborted."""
    definition = pb.SagaDefinition(
        name="slow",
        steps=[
            step("reserve", "ledger-a"),
            step("wait", "ledger-b", "Fail", compensate=False, attempts=100),
        ],
    )
    definition.steps[1].retry.initial_backoff.FromMilliseconds(backoff_ms)
    definition.steps[1].retry.max_backoff.FromMilliseconds(backoff_ms)
    definition.steps[1].retry.non_retryable_codes.append(16)
    return definition


async def start_slow(
    start: saga_pb2_grpc.SagaCoordinatorStub,
    watch: saga_pb2_grpc.SagaCoordinatorStub,
    key: str,
    backoff_ms: int = 500,
) -> str:
    """Start a slow saga through ``start``; return once ``watch`` sees its second step failing."""
    started = await start.StartSaga(
        pb.StartSagaRequest(definition=slow_definition(backoff_ms), input=b"", idempotency_key=key),
        timeout=10,
    )
    saga_id = started.saga.saga_id

    async def failing() -> bool:
        saga = (await watch.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=10)).saga
        return saga.steps[1].attempts >= 1

    await wait_until(failing)
    return saga_id


async def leader_pid(url: str) -> int | None:
    """Backend pid of the session holding the saga leader lock."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (
            await conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND ((classid::bigint << 32) | objid::bigint) = %s",
                (SAGA_LEADER_LOCK,),
            )
        ).fetchone()
    return int(row[0]) if row is not None else None


async def wait_until(condition: object, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not await condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.fixture
def cluster(postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    a, a_address = start_control_plane(tmp_path / "a", "--store", postgres_url)
    processes = [a]
    try:
        deadline = time.monotonic() + 30
        while not _held(postgres_url):  # a takes the lock first, so it is the leader
            assert time.monotonic() < deadline, "no node took the saga leader lock"
            time.sleep(0.05)
        b, b_address = start_control_plane(tmp_path / "b", "--store", postgres_url)
        processes.append(b)
        # The participants' processes go into the same list, so the cleanup below ends them too.
        world = Mesh(data_dir=tmp_path / "b", address=b_address, plane=b, processes=processes)
        start_participants(world, b_address, tmp_path)
        yield Cluster(postgres_url, a, a_address, b, b_address, world, processes)
    finally:
        for proc in processes:
            proc.signal(signal.SIGCONT)
            proc.kill()


def _held(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid::bigint = %s",
            (SAGA_LEADER_LOCK,),
        ).fetchone()
    return row is not None


@pytest.fixture
async def stubs(cluster: Cluster) -> AsyncIterator[tuple[saga_pb2_grpc.SagaCoordinatorStub, ...]]:
    async with (
        grpc.aio.insecure_channel(cluster.a_address) as a,
        grpc.aio.insecure_channel(cluster.b_address) as b,
    ):
        yield saga_pb2_grpc.SagaCoordinatorStub(a), saga_pb2_grpc.SagaCoordinatorStub(b)


def start_request(name: str, index: int) -> pb.StartSagaRequest:
    return pb.StartSagaRequest(
        definition_name=name,
        input=wrappers_pb2.StringValue(value=f"order-{index}").SerializeToString(),
        idempotency_key=f"multi-{index}",
    )


async def register_definitions(stub: saga_pb2_grpc.SagaCoordinatorStub) -> None:
    for definition in definitions():
        await stub.RegisterDefinition(pb.RegisterDefinitionRequest(definition=definition), timeout=10)


async def start_sagas(
    plan: dict[str, str], indexes: range, *stubs: saga_pb2_grpc.SagaCoordinatorStub
) -> pb.StartSagaResponse:
    """Start one saga per index (every third ``bad3``), through the stubs in turn; record them in ``plan``."""
    for index in indexes:
        name = "bad3" if index % 3 == 0 else "ok3"
        response = await stubs[index % len(stubs)].StartSaga(start_request(name, index), timeout=10)
        assert response.created
        plan[response.saga.saga_id] = name
    return response


async def all_sagas(stub: saga_pb2_grpc.SagaCoordinatorStub) -> dict[str, pb.Saga]:
    sagas: dict[str, pb.Saga] = {}
    token = ""
    while True:
        page = await stub.ListSagas(pb.ListSagasRequest(page_size=1000, page_token=token), timeout=10)
        sagas.update({s.saga_id: s for s in page.sagas})
        token = page.next_page_token
        if not token:
            return sagas


async def wait_finished(
    stub: saga_pb2_grpc.SagaCoordinatorStub, ids: set[str], limit: float = 60
) -> dict[str, pb.Saga]:
    deadline = time.monotonic() + limit
    while True:
        sagas = await all_sagas(stub)
        if all(i in sagas and sagas[i].state in TERMINAL for i in ids) or time.monotonic() > deadline:
            return sagas
        await asyncio.sleep(0.1)


def check_effects(world: Mesh, plan: dict[str, str]) -> None:
    """Each step took effect once; each completed step of a compensated saga was undone once."""
    effects = {
        (saga, step_name): (applied, undone)
        for service in SERVICES
        for saga, step_name, applied, undone, _ in world.effects(service)
    }
    for saga_id, name in plan.items():
        for step_name in ["reserve", "charge"] + (["ship"] if name == "ok3" else []):
            applied, undone = effects[(saga_id, step_name)]
            assert applied == 1, (saga_id, step_name, applied)
            assert undone == (1 if name == "bad3" else 0), (saga_id, step_name, undone)


async def watch_to_end(stub: saga_pb2_grpc.SagaCoordinatorStub, saga_id: str) -> list[pb.WatchSagaResponse]:
    seen: list[pb.WatchSagaResponse] = []
    async for response in stub.WatchSaga(pb.WatchSagaRequest(saga_id=saga_id), timeout=60):
        seen.append(response)
    return seen


@pytest.mark.backend
async def test_both_nodes_accept_one_drives(
    cluster: Cluster, stubs: tuple[saga_pb2_grpc.SagaCoordinatorStub, ...]
) -> None:
    a, b = stubs
    await register_definitions(a)
    # The follower knows a definition registered through the leader.
    assert (await b.GetDefinition(pb.GetDefinitionRequest(name="bad3"), timeout=10)).definition.version == 1
    # Two versions of one name registered through both nodes at once: both stored, each under its
    # own number, and both nodes agree on the content of each.
    one, two = slow_definition(), slow_definition()
    two.steps[0].timeout.FromSeconds(9)
    registered = await asyncio.gather(
        *(
            stub.RegisterDefinition(pb.RegisterDefinitionRequest(definition=d))
            for stub, d in ((a, one), (b, two))
        )
    )
    assert sorted(r.definition.version for r in registered) == [1, 2]
    for response in registered:
        for stub in (a, b):
            request = pb.GetDefinitionRequest(name="slow", version=response.definition.version)
            assert (await stub.GetDefinition(request, timeout=10)).definition == response.definition

    # The same key through both nodes at once: one saga.
    same = await asyncio.gather(a.StartSaga(start_request("ok3", 0)), b.StartSaga(start_request("ok3", 0)))
    assert same[0].saga.saga_id == same[1].saga.saga_id
    assert sorted(r.created for r in same) == [False, True]

    plan = {same[0].saga.saga_id: "ok3"}
    watched = asyncio.create_task(watch_to_end(b, same[0].saga.saga_id))  # a follower watches live
    response = await start_sagas(plan, range(1, 41), b, a)
    # A saga started through the leader is known to the follower at once (read from the store).
    assert (await b.GetSaga(pb.GetSagaRequest(saga_id=response.saga.saga_id), timeout=10)).saga.saga_id

    # Start and wait for the outcome through the follower (it hears the leader's transitions).
    request = start_request("ok3", 41)
    request.wait.FromSeconds(30)
    waited = await b.StartSaga(request, timeout=40)
    assert waited.created and waited.saga.state == pb.SAGA_STATE_COMPLETED, waited.saga
    plan[waited.saga.saga_id] = "ok3"

    sagas = await wait_finished(b, set(plan))
    for saga_id, name in plan.items():
        expected = pb.SAGA_STATE_COMPLETED if name == "ok3" else pb.SAGA_STATE_COMPENSATED
        assert sagas[saga_id].state == expected, sagas[saga_id]
        assert (await a.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=10)).saga.state == expected
    transitions = await asyncio.wait_for(watched, 30)
    kinds = [t.transition.kind for t in transitions]
    assert kinds[0] == "saga_started" and kinds[-1] == "saga_completed", kinds
    assert kinds.count("step_succeeded") == 3, kinds
    assert transitions[-1].saga.state == pb.SAGA_STATE_COMPLETED
    check_effects(cluster.world, plan)

    # AbortSaga through the follower: recorded there, the leader (waiting 60 s to retry) compensates now.
    slow = await start_slow(b, a, "slow-abort", backoff_ms=60_000)
    aborted = await b.AbortSaga(pb.AbortSagaRequest(saga_id=slow, reason="customer cancelled"), timeout=10)
    assert aborted.saga.state == pb.SAGA_STATE_ABORTING
    final = await wait_finished(a, {slow}, limit=20)
    assert final[slow].state == pb.SAGA_STATE_ABORTED and final[slow].error == "customer cancelled"
    assert (slow, "reserve", 1, 1, 0) in cluster.world.effects("ledger-a")

    # Exactly one node drove: no execution call was made twice with the same key.
    for service in SERVICES:
        executes = Counter(key for method, key, *_ in cluster.world.calls(service) if method == "Do")
        assert executes and max(executes.values()) == 1, (service, executes.most_common(3))


@pytest.mark.backend
@pytest.mark.fault
async def test_leader_killed_mid_run_the_other_node_finishes_every_saga(
    cluster: Cluster, stubs: tuple[saga_pb2_grpc.SagaCoordinatorStub, ...]
) -> None:
    a, b = stubs
    await register_definitions(b)
    first_pid = await leader_pid(cluster.url)
    plan: dict[str, str] = {}
    await start_sagas(plan, range(60), b, a)
    watched_id = next(iter(plan))
    watched = asyncio.create_task(watch_to_end(b, watched_id))

    async def moved() -> bool:
        pid = await leader_pid(cluster.url)
        return pid is not None and pid != first_pid

    async def takeover_seconds() -> float:
        await wait_until(moved)
        return time.monotonic() - killed

    cluster.a.kill()  # kill -9 of the leader while its sagas run
    killed = time.monotonic()
    takeover = asyncio.create_task(takeover_seconds())
    unfinished = [s for s in (await all_sagas(b)).values() if s.state not in FINAL]
    await start_sagas(plan, range(60, 90), b)  # the survivor keeps accepting
    took_over = await takeover
    sagas = await wait_finished(b, set(plan))
    for saga_id, name in plan.items():
        expected = pb.SAGA_STATE_COMPLETED if name == "ok3" else pb.SAGA_STATE_COMPENSATED
        assert sagas[saga_id].state == expected, sagas[saga_id]
    check_effects(cluster.world, plan)
    transitions = await asyncio.wait_for(watched, 30)
    assert transitions[-1].saga.state in FINAL
    print(f"{len(unfinished)} sagas unfinished at the kill; lock moved after {took_over:.2f}s")


@pytest.mark.backend
@pytest.mark.fault
async def test_frozen_leader_is_replaced_and_stops_when_it_wakes(
    cluster: Cluster, stubs: tuple[saga_pb2_grpc.SagaCoordinatorStub, ...]
) -> None:
    a, b = stubs
    await register_definitions(b)
    first_pid = await leader_pid(cluster.url)
    # The leader is retrying a step every 500 ms when it is frozen with its session open.
    slow = await start_slow(a, b, "slow-frozen")
    cluster.a.signal(signal.SIGSTOP)
    frozen = time.monotonic()
    plan: dict[str, str] = {}
    await start_sagas(plan, range(10), b)  # accepted while nobody drives; run once the other node takes over

    async def moved() -> bool:
        pid = await leader_pid(cluster.url)
        return pid is not None and pid != first_pid

    await wait_until(moved, limit=30)  # PostgreSQL ended the frozen session (idle_session_timeout)
    print(f"lock moved {time.monotonic() - frozen:.2f}s after SIGSTOP")
    sagas = await wait_finished(b, set(plan))
    for saga_id, name in plan.items():
        expected = pb.SAGA_STATE_COMPLETED if name == "ok3" else pb.SAGA_STATE_COMPENSATED
        assert sagas[saga_id].state == expected, sagas[saga_id]
    await b.AbortSaga(pb.AbortSagaRequest(saga_id=slow, reason="stop"), timeout=10)
    assert (await wait_finished(b, {slow}, limit=30))[slow].state == pb.SAGA_STATE_ABORTED
    calls_before = sum(len(cluster.world.calls(s)) for s in SERVICES)
    cluster.a.signal(signal.SIGCONT)
    # The woken node's runner was due to retry: its lease has run out, so it makes no call;
    # it steps down and serves again as a follower.
    await wait_until(lambda: _serves(a, slow))

    async def mirrored() -> bool:  # its ListSagas (served from its mirror of the log) caught up
        listed = await all_sagas(a)
        return all(i in listed and listed[i].state in TERMINAL for i in [*plan, slow])

    await wait_until(mirrored)
    await asyncio.sleep(1.5)
    assert sum(len(cluster.world.calls(s)) for s in SERVICES) == calls_before
    check_effects(cluster.world, plan)
    assert (slow, "reserve", 1, 1, 0) in cluster.world.effects("ledger-a")


async def _serves(stub: saga_pb2_grpc.SagaCoordinatorStub, saga_id: str) -> bool:
    try:
        saga = (await stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=2)).saga
    except grpc.aio.AioRpcError:
        return False
    return saga.state in TERMINAL
