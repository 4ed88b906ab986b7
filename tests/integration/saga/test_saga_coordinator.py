"""SagaCoordinator through a real `rpcmesh up` and real participant processes."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
from google.protobuf import duration_pb2, wrappers_pb2
from rpcmesh.v1 import saga_pb2 as pb
from rpcmesh.v1 import saga_pb2_grpc

from rpcmesh.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, from_rpc_error
from tests.integration.saga.conftest import Mesh, step, three_steps

TERMINAL = {
    pb.SAGA_STATE_COMPLETED,
    pb.SAGA_STATE_COMPENSATED,
    pb.SAGA_STATE_FAILED_COMPENSATION,
    pb.SAGA_STATE_ABORTED,
}


def payload(text: str) -> bytes:
    return wrappers_pb2.StringValue(value=text).SerializeToString()


async def wait_terminal(
    stub: saga_pb2_grpc.SagaCoordinatorStub, saga_id: str, seconds: float = 30
) -> pb.Saga:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        saga = (await stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id))).saga
        if saga.state in TERMINAL:
            return saga
        assert asyncio.get_running_loop().time() < deadline, saga
        await asyncio.sleep(0.05)


async def test_saga_completes_with_retries_and_carries_context(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        registered = await stub.RegisterDefinition(pb.RegisterDefinitionRequest(definition=three_steps()))
        assert registered.definition.version == 1
        trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        started = await stub.StartSaga(
            pb.StartSagaRequest(definition_name="transfer", input=payload("order-1"), idempotency_key="k1"),
            metadata=(("traceparent", trace), ("x-correlation-id", "corr-1")),
        )
        assert started.created
        saga = await wait_terminal(stub, started.saga.saga_id)
        assert saga.state == pb.SAGA_STATE_COMPLETED
        assert [s.state for s in saga.steps] == [pb.STEP_STATE_SUCCEEDED] * 3
        assert saga.steps[1].attempts == 2  # Flaky failed once with UNAVAILABLE
        assert wrappers_pb2.StringValue.FromString(saga.steps[0].result).value == "ledger-a:order-1"
        assert saga.trace_context["traceparent"] == trace and saga.correlation_id == "corr-1"
        again = await stub.StartSaga(
            pb.StartSagaRequest(definition_name="transfer", input=payload("order-1"), idempotency_key="k1")
        )
        assert not again.created and again.saga.saga_id == saga.saga_id
    calls = mesh.calls("ledger-b")
    assert {c[0] for c in calls} == {"Flaky"} and len(calls) == 2
    assert calls[0][1] == calls[1][1] == f"{saga.saga_id}/charge/execute"
    assert all(
        c[4] == trace and c[5] == "corr-1" for name in ("ledger-a", "ledger-b") for c in mesh.calls(name)
    )


async def test_failed_step_compensates_completed_steps_in_reverse(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        started = await stub.StartSaga(
            pb.StartSagaRequest(definition=three_steps("doomed", fail_last=True), input=payload("x"))
        )
        saga = await wait_terminal(stub, started.saga.saga_id)
        assert saga.state == pb.SAGA_STATE_COMPENSATED
        assert [s.state for s in saga.steps] == [
            pb.STEP_STATE_COMPENSATED,
            pb.STEP_STATE_COMPENSATED,
            pb.STEP_STATE_FAILED,
        ]
        assert saga.steps[2].attempts == 1  # FAILED_PRECONDITION is not retried
        assert "FAILED_PRECONDITION" in saga.error
        kinds = [m.transition.kind async for m in stub.WatchSaga(pb.WatchSagaRequest(saga_id=saga.saga_id))]
        assert kinds[0] == "saga_started" and kinds[-1] == "saga_compensated"
        assert kinds.index("compensation_succeeded") > kinds.index("step_failed")
        listed = await stub.ListSagas(pb.ListSagasRequest(states=[pb.SAGA_STATE_COMPENSATED]))
        assert [s.saga_id for s in listed.sagas] == [saga.saga_id]
    assert mesh.effects("ledger-a") == [(saga.saga_id, "reserve", 1, 1, 0)]
    assert mesh.effects("ledger-b") == [(saga.saga_id, "charge", 1, 1, 0)]
    undo_order = [c for name in ("ledger-a", "ledger-b") for c in mesh.calls(name) if c[0] == "Undo"]
    assert len(undo_order) == 2


async def test_bad_definitions_are_refused_and_nothing_starts(mesh: Mesh) -> None:
    bad_method = three_steps("bad")
    bad_method.steps[1].method = "charge"
    missing_comp = three_steps("bad")
    missing_comp.steps[0].compensation_method = ""
    duplicate = three_steps("bad")
    duplicate.steps[2].name = "reserve"
    forward = three_steps("bad")
    forward.steps[0].request.base_from = "ship"
    oversized = three_steps("bad")
    oversized.steps[0].request.base = b"x" * 300_000
    cases = [
        (bad_method, "definition.steps[1].method", "charge"),
        (missing_comp, "definition.steps[0].compensation_method", "reserve"),
        (duplicate, "definition.steps[2].name", "reserve"),
        (forward, "definition.steps[0].request.base_from", "reserve"),
        (oversized, "definition.steps[0].request.base", "reserve"),
    ]
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        for definition, field, step_name in cases:
            for call in (
                stub.StartSaga(pb.StartSagaRequest(definition=definition)),
                stub.RegisterDefinition(pb.RegisterDefinitionRequest(definition=definition)),
            ):
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    error = from_rpc_error(exc)
                    assert isinstance(error, InvalidArgumentError)
                    assert error.message.startswith(field + ":") and step_name in error.message, error.message
                else:
                    raise AssertionError(f"{field} accepted")
        listed = await stub.ListSagas(pb.ListSagasRequest())
        assert not listed.sagas
        bad_time = pb.ListSagasRequest()
        bad_time.started_after.nanos = -1
        try:
            await stub.ListSagas(bad_time)
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            assert isinstance(error, InvalidArgumentError)
            assert error.message.startswith("started_after.nanos:")
        else:
            raise AssertionError("a negative nanos Timestamp was accepted")
        try:
            await stub.GetSaga(pb.GetSagaRequest(saga_id="nope"))
        except grpc.aio.AioRpcError as exc:
            assert isinstance(from_rpc_error(exc), NotFoundError)


async def test_abort_compensates_what_completed(mesh: Mesh) -> None:
    definition = pb.SagaDefinition(
        name="slow",
        steps=[step("reserve", "ledger-a"), step("wait", "ledger-b", "Fail", compensate=False, attempts=100)],
    )
    definition.steps[1].retry.initial_backoff.FromMilliseconds(500)
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        definition.steps[1].retry.non_retryable_codes.append(16)  # so FAILED_PRECONDITION is retried
        started = await stub.StartSaga(pb.StartSagaRequest(definition=definition, input=payload("a")))
        saga_id = started.saga.saga_id
        while (await stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id))).saga.steps[1].attempts < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        aborted = await stub.AbortSaga(pb.AbortSagaRequest(saga_id=saga_id, reason="customer cancelled"))
        assert aborted.saga.state == pb.SAGA_STATE_ABORTING
        saga = await wait_terminal(stub, saga_id)
        assert saga.state == pb.SAGA_STATE_ABORTED and saga.error == "customer cancelled"
        try:
            await stub.AbortSaga(pb.AbortSagaRequest(saga_id=saga_id))
        except grpc.aio.AioRpcError as exc:
            assert isinstance(from_rpc_error(exc), FailedPreconditionError)
    assert mesh.effects("ledger-a") == [(saga_id, "reserve", 1, 1, 0)]


async def test_unfinished_sagas_resume_after_kill(mesh: Mesh) -> None:
    definition = pb.SagaDefinition(
        name="retrying",
        steps=[step("reserve", "ledger-a"), step("ship", "ledger-c", "Fail", compensate=False)],
    )
    definition.steps[1].retry.max_attempts = 4
    definition.steps[1].retry.initial_backoff.FromMilliseconds(700)
    definition.steps[1].retry.non_retryable_codes.append(16)
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        started = await stub.StartSaga(
            pb.StartSagaRequest(definition=definition, input=payload("a")),
            metadata=(("traceparent", "00-11111111111111111111111111111111-2222222222222222-01"),),
        )
    saga_id = started.saga.saga_id
    mesh.restart(kill=True)
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        saga = await wait_terminal(stub, saga_id, seconds=60)
    assert saga.state == pb.SAGA_STATE_COMPENSATED
    assert saga.steps[1].attempts >= 4
    assert mesh.effects("ledger-a") == [(saga_id, "reserve", 1, 1, 0)]
    assert all(c[4].startswith("00-1111") for c in mesh.calls("ledger-c") + mesh.calls("ledger-a"))


async def test_start_and_get_saga_wait_long_poll_until_the_saga_ends(mesh: Mesh) -> None:
    definition = pb.SagaDefinition(
        name="held",
        steps=[step("reserve", "ledger-a"), step("wait", "ledger-b", "Fail", compensate=False, attempts=100)],
    )
    definition.steps[1].retry.initial_backoff.FromMilliseconds(200)
    definition.steps[1].retry.non_retryable_codes.append(16)  # so FAILED_PRECONDITION is retried
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        started = await stub.StartSaga(pb.StartSagaRequest(definition=three_steps(), input=payload("w")))
        done = await stub.GetSaga(
            pb.GetSagaRequest(saga_id=started.saga.saga_id, wait=duration_pb2.Duration(seconds=30)),
            timeout=60,
        )
        assert done.saga.state == pb.SAGA_STATE_COMPLETED  # one call: answered once it ended
        # Start and wait in one call; the same key later answers with the ended saga at once.
        request = pb.StartSagaRequest(
            definition=three_steps(),
            input=payload("s"),
            idempotency_key="sw",
            wait=duration_pb2.Duration(seconds=30),
        )
        ran = await stub.StartSaga(request, timeout=60)
        assert ran.created and ran.saga.state == pb.SAGA_STATE_COMPLETED
        again = await stub.StartSaga(request, timeout=60)
        assert not again.created and again.saga == ran.saga
        try:
            bad = pb.StartSagaRequest(definition=three_steps(), input=payload("b"), idempotency_key="never")
            bad.wait.seconds = -1
            await stub.StartSaga(bad)
            raise AssertionError("accepted")
        except grpc.aio.AioRpcError as exc:
            assert isinstance(from_rpc_error(exc), InvalidArgumentError)
        listed = await stub.ListSagas(pb.ListSagasRequest())
        assert all(s.idempotency_key != "never" for s in listed.sagas)  # nothing started

        started = await stub.StartSaga(pb.StartSagaRequest(definition=definition, input=payload("h")))
        saga_id = started.saga.saga_id
        # The wait ends without the saga ending: the saga as it is, not an error.
        held = await stub.GetSaga(
            pb.GetSagaRequest(saga_id=saga_id, wait=duration_pb2.Duration(nanos=300_000_000))
        )
        assert held.saga.state == pb.SAGA_STATE_RUNNING
        # A caller's deadline shorter than the wait: answered before it, not DEADLINE_EXCEEDED.
        held = await stub.GetSaga(
            pb.GetSagaRequest(saga_id=saga_id, wait=duration_pb2.Duration(seconds=60)), timeout=1.0
        )
        assert held.saga.state == pb.SAGA_STATE_RUNNING
        waiting = asyncio.ensure_future(
            stub.GetSaga(
                pb.GetSagaRequest(saga_id=saga_id, wait=duration_pb2.Duration(seconds=60)), timeout=60
            )
        )
        await stub.AbortSaga(pb.AbortSagaRequest(saga_id=saga_id, reason="stop"))
        assert (await waiting).saga.state == pb.SAGA_STATE_ABORTED

        for wait, field in (
            (duration_pb2.Duration(seconds=-1), "wait"),
            (duration_pb2.Duration(seconds=7200), "wait"),
        ):
            try:
                await stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id, wait=wait))
                raise AssertionError("accepted")
            except grpc.aio.AioRpcError as exc:
                assert isinstance(from_rpc_error(exc), InvalidArgumentError) and field in (
                    exc.details() or ""
                )
        try:
            await stub.GetSaga(pb.GetSagaRequest(saga_id="nope", wait=duration_pb2.Duration(seconds=1)))
            raise AssertionError("found")
        except grpc.aio.AioRpcError as exc:
            assert isinstance(from_rpc_error(exc), NotFoundError)
