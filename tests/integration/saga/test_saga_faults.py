"""Item 9: 200 sagas while the coordinator is killed -9 at random moments, 100 times.

Invariants, checked at the participants (real processes recording every
invocation and effect): every saga ends COMPLETED or COMPENSATED, no step
takes effect twice, and every step of a compensated saga that took effect is
undone exactly once (completed sagas keep all their effects).
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import grpc
import grpc.aio
import pytest
from google.protobuf import wrappers_pb2
from rpcmesh.v1 import saga_pb2 as pb
from rpcmesh.v1 import saga_pb2_grpc

from tests.integration.saga.conftest import Mesh, ok_and_failing_definitions

SAGAS = 200
# RPCMESH_SAGA_FAULT_KILLS sets the number of kills (100 by default).
KILLS = int(os.environ.get("RPCMESH_SAGA_FAULT_KILLS", "100"))


def definitions() -> dict[str, pb.SagaDefinition]:
    return {definition.name: definition for definition in ok_and_failing_definitions()}


async def retry(call: object, *args: object, **kwargs: object) -> object:
    """Retry a control-plane call across restarts."""
    while True:
        try:
            return await call(*args, timeout=5.0, **kwargs)  # type: ignore[operator]
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNKNOWN,
                grpc.StatusCode.CANCELLED,
            ):
                raise
            await asyncio.sleep(0.05)


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_sagas_survive_random_kills(mesh: Mesh) -> None:
    rng = random.Random(6)
    defs = definitions()
    began = time.monotonic()
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        for definition in defs.values():
            await retry(stub.RegisterDefinition, pb.RegisterDefinitionRequest(definition=definition))
        plan = ["bad3" if i % 3 == 0 else "ok3" for i in range(SAGAS)]
        saga_ids: dict[int, str] = {}

        async def starter() -> None:
            for index, name in enumerate(plan):
                request = pb.StartSagaRequest(
                    definition_name=name,
                    input=wrappers_pb2.StringValue(value=f"order-{index}").SerializeToString(),
                    idempotency_key=f"fault-{index}",
                )
                response = await retry(stub.StartSaga, request)
                saga_ids[index] = response.saga.saga_id  # type: ignore[attr-defined]
                await asyncio.sleep(rng.uniform(0, 0.02))

        start_task = asyncio.create_task(starter())
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.0, 0.25))
            await asyncio.to_thread(mesh.restart, kill=True)
        await start_task
        killed_for = time.monotonic() - began

        sagas: dict[str, pb.Saga] = {}
        deadline = time.monotonic() + 60
        while True:
            sagas = {}
            token = ""
            while True:
                page = await retry(stub.ListSagas, pb.ListSagasRequest(page_size=1000, page_token=token))
                sagas.update({s.saga_id: s for s in page.sagas})  # type: ignore[attr-defined]
                token = page.next_page_token  # type: ignore[attr-defined]
                if not token:
                    break
            open_ = [
                s
                for s in sagas.values()
                if s.state not in (pb.SAGA_STATE_COMPLETED, pb.SAGA_STATE_COMPENSATED)
            ]
            if not open_ or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)

    assert len(saga_ids) == SAGAS and set(saga_ids.values()) <= set(sagas)
    for index, saga_id in saga_ids.items():
        expected = pb.SAGA_STATE_COMPENSATED if plan[index] == "bad3" else pb.SAGA_STATE_COMPLETED
        assert sagas[saga_id].state == expected, sagas[saga_id]
    effects = {
        (saga, step_name): (applied, undone)
        for service in ("ledger-a", "ledger-b", "ledger-c")
        for saga, step_name, applied, undone, _ in mesh.effects(service)
    }
    for index, saga_id in saga_ids.items():
        steps = ["reserve", "charge"] + (["ship"] if plan[index] == "ok3" else [])
        for step_name in steps:
            applied, undone = effects[(saga_id, step_name)]
            assert applied == 1, (saga_id, step_name, applied)  # idempotent: took effect once
            assert undone == (1 if plan[index] == "bad3" else 0), (saga_id, step_name, undone)
    print(f"{KILLS} kills over {killed_for:.1f}s; total {time.monotonic() - began:.1f}s")
