"""ListSagas paging through a real `rpcmesh up` while sagas start and end between pages.

The page token resumes after the last saga returned (keyset), not at an offset into a list
rebuilt on each call: a saga of an earlier page that leaves the filtered states must not make a
later one be skipped, and a saga started between pages must not make the next page repeat one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from rpcmesh.v1 import saga_pb2 as pb
from rpcmesh.v1 import saga_pb2_grpc

from rpcmesh.errors import InvalidArgumentError, from_rpc_error
from tests.integration.saga.conftest import stuck_definition
from tests.support.processes import start_control_plane

RUNNING = [pb.SAGA_STATE_RUNNING]


@pytest.fixture
async def stub(tmp_path: Path) -> AsyncIterator[saga_pb2_grpc.SagaCoordinatorStub]:
    plane, address = start_control_plane(tmp_path / "data")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            yield saga_pb2_grpc.SagaCoordinatorStub(channel)
    finally:
        plane.kill()


async def start_stuck(stub: saga_pb2_grpc.SagaCoordinatorStub) -> str:
    started = await stub.StartSaga(
        pb.StartSagaRequest(definition=stuck_definition(), idempotency_key=uuid.uuid4().hex), timeout=30
    )
    assert started.saga.state == pb.SAGA_STATE_RUNNING
    await asyncio.sleep(0.01)  # distinct start times, so the newest-first order is the start order
    return str(started.saga.saga_id)


async def start_many(stub: saga_pb2_grpc.SagaCoordinatorStub, count: int) -> list[str]:
    """``count`` RUNNING sagas, newest first (the order ListSagas gives)."""
    return [await start_stuck(stub) for _ in range(count)][::-1]


async def page(stub: saga_pb2_grpc.SagaCoordinatorStub, token: str = "") -> tuple[list[str], str]:
    response = await stub.ListSagas(
        pb.ListSagasRequest(states=RUNNING, page_size=2, page_token=token), timeout=30
    )
    return [s.saga_id for s in response.sagas], response.next_page_token


async def rest(stub: saga_pb2_grpc.SagaCoordinatorStub, token: str) -> list[str]:
    """Every saga on the pages from ``token`` to the end."""
    listed: list[str] = []
    while token:
        ids, token = await page(stub, token)
        listed.extend(ids)
    return listed


async def abort(stub: saga_pb2_grpc.SagaCoordinatorStub, saga_id: str) -> None:
    await stub.AbortSaga(pb.AbortSagaRequest(saga_id=saga_id, reason="test"), timeout=30)
    deadline = asyncio.get_running_loop().time() + 30
    while (await stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=30)).saga.state in RUNNING:
        assert asyncio.get_running_loop().time() < deadline, f"{saga_id} still RUNNING"
        await asyncio.sleep(0.05)


async def test_a_saga_leaving_the_filter_between_pages_skips_none(
    stub: saga_pb2_grpc.SagaCoordinatorStub,
) -> None:
    sagas = await start_many(stub, 6)
    first, token = await page(stub)
    assert first == sagas[:2] and token
    await abort(stub, first[0])  # no longer RUNNING: every later saga moves up one place
    listed = first + await rest(stub, token)
    assert sorted(listed) == sorted(sagas), "a still-running saga was skipped or listed twice"
    assert listed == sagas  # each once, newest first


async def test_a_saga_started_between_pages_repeats_none(stub: saga_pb2_grpc.SagaCoordinatorStub) -> None:
    sagas = await start_many(stub, 5)
    first, token = await page(stub)
    assert first == sagas[:2] and token
    newer = await start_stuck(stub)  # sorts before every saga already listed
    listed = first + await rest(stub, token)
    assert newer not in listed  # it started after the listing's first page: it is for a fresh listing
    assert listed == sagas, "a saga was listed twice or skipped"
    # A fresh listing has it first, and a saga leaving and one starting in the same gap are both fine.
    first, token = await page(stub)
    assert first == [newer, sagas[0]]
    await abort(stub, newer)
    await abort(stub, sagas[2])  # on the next page: simply not listed
    latest = await start_stuck(stub)
    assert first + await rest(stub, token) == [newer, *sagas[:2], *sagas[3:]]
    again, token = await page(stub)
    assert again == [latest, sagas[0]]


def token_of(body: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


async def test_a_bad_page_token_is_invalid_argument(stub: saga_pb2_grpc.SagaCoordinatorStub) -> None:
    await start_many(stub, 3)
    _, token = await page(stub)
    assert token
    other_filters = pb.ListSagasRequest(states=[pb.SAGA_STATE_ABORTED], page_size=2, page_token=token)
    scope = json.dumps([[pb.SAGA_STATE_RUNNING], "", 0, 0])
    bad = [
        "not a token!",
        token_of([1, 2]),
        token_of({"k": "defs", "s": "", "v": 2}),
        token_of({"k": "sagas", "s": scope, "v": 2}),  # an offset token of the old kind
        token_of({"k": "sagas", "s": scope, "t": "yesterday", "i": "x"}),
        token_of({"k": "sagas", "s": scope, "t": True, "i": "x"}),
        token_of({"k": "sagas", "s": scope, "t": 1.5, "i": 7}),
        base64.urlsafe_b64encode(b'{"k":"sagas","s":' + json.dumps(scope).encode() + b',"t":NaN,"i":"x"}')
        .decode()
        .rstrip("="),
        base64.urlsafe_b64encode(b"[" * 100_000).decode(),
    ]
    requests = [pb.ListSagasRequest(states=RUNNING, page_size=2, page_token=t) for t in bad]
    for request in [*requests, other_filters]:
        try:
            await stub.ListSagas(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            assert isinstance(error, InvalidArgumentError), (request.page_token, exc)
            assert error.message.startswith("page_token:"), error.message
        else:
            raise AssertionError(f"page token {request.page_token[:60]!r} accepted")
