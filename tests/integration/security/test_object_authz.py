"""Authorization per object: an identity acts only on the sagas and consumer groups its policy covers.

Two identities against a real `rpcmesh up`, once with client certificates (mTLS) and once with bearer
tokens: ``payments`` may run ``refund`` sagas and ``orders`` ``place-order`` sagas. Saga ids travel to
every participant (``x-saga-id``), so knowing one must not let ``orders`` read, watch or abort a
``refund`` saga, nor see it in a list. ``orders`` may read ``payments.*`` topics, but only in its own
consumer groups: joining ``payments-ledger`` would take that group's messages from ``payments``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc, saga_pb2_grpc
from rpcmesh.v1 import saga_pb2 as pb

from rpcmesh.security.certs import write_development_set
from rpcmesh.security.client import ClientSecurity, aio_channel
from rpcmesh.security.tls import ClientTlsConfig
from rpcmesh.security.tokens import mint_token
from tests.integration.saga.conftest import step
from tests.integration.security.conftest import coordinator_args
from tests.support.processes import start_control_plane

POLICY = """\
identities:
  orders:
    sagas: [place-order]
    calls: [inventory, "payments/Refund", place-order-ledger]
    subscribe: ["payments.*"]
  payments:
    sagas: [refund]
    calls: [refund-ledger]
    publish: ["payments.*"]
    subscribe: ["payments.*"]
"""
SECRET = b"object-authz-secret-0123456789abcdef"
TIMEOUT = 10.0


@dataclass(frozen=True)
class Plane:
    address: str
    folder: Path
    mode: str

    def security(self, identity: str) -> ClientSecurity:
        if self.mode == "mtls":
            return ClientSecurity(
                tls=ClientTlsConfig(
                    ca_file=self.folder / "ca.crt",
                    cert_file=self.folder / f"client-{identity}.crt",
                    key_file=self.folder / f"client-{identity}.key",
                )
            )
        token = mint_token(SECRET, subject=identity, issuer="rpcmesh", ttl=600)
        return ClientSecurity(tls=ClientTlsConfig(ca_file=self.folder / "ca.crt"), token=token)


@pytest.fixture(scope="module", params=["mtls", "token"])
def plane(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    folder = tmp_path_factory.mktemp("authz-pki")
    write_development_set(folder, clients=["orders", "payments", "rpcmesh-coordinator"])
    (folder / "token.secret").write_bytes(SECRET)
    (folder / "policy.yaml").write_text(POLICY)
    extra = ["--tls-client-auth", *coordinator_args(folder)] if request.param == "mtls" else []
    proc, address = start_control_plane(
        folder / "data",
        "--tls-cert",
        str(folder / "server.crt"),
        "--tls-key",
        str(folder / "server.key"),
        "--tls-ca",
        str(folder / "ca.crt"),
        "--token-secret-file",
        str(folder / "token.secret"),
        "--policy",
        str(folder / "policy.yaml"),
        *extra,
    )
    try:
        yield Plane(address=address, folder=folder, mode=request.param)
    finally:
        proc.kill()


@pytest.fixture
async def stubs(plane: Plane) -> AsyncIterator[dict[str, saga_pb2_grpc.SagaCoordinatorStub]]:
    channels = {name: aio_channel(plane.address, plane.security(name)) for name in ("orders", "payments")}
    try:
        yield {name: saga_pb2_grpc.SagaCoordinatorStub(channel) for name, channel in channels.items()}
    finally:
        for channel in channels.values():
            await channel.close()


async def _start(stub: saga_pb2_grpc.SagaCoordinatorStub, name: str) -> str:
    # The step's service is never registered: the saga stays RUNNING, which is all these tests need.
    definition = pb.SagaDefinition(name=name, steps=[step("charge", f"{name}-ledger")])
    started = await stub.StartSaga(
        pb.StartSagaRequest(definition=definition, input=b"card=4111111111111111"), timeout=TIMEOUT
    )
    return started.saga.saga_id


async def _denied(call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        result = await call  # type: ignore[misc]
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value
    return caught.value.details() or ""


async def test_an_identity_cannot_read_watch_or_abort_another_identitys_saga(
    stubs: dict[str, saga_pb2_grpc.SagaCoordinatorStub],
) -> None:
    orders, payments = stubs["orders"], stubs["payments"]
    refund = await _start(payments, "refund")

    reason = await _denied(orders.GetSaga(pb.GetSagaRequest(saga_id=refund), timeout=TIMEOUT))
    assert "orders" in reason and "refund" in reason
    await _denied(orders.AbortSaga(pb.AbortSagaRequest(saga_id=refund, reason="x"), timeout=TIMEOUT))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in orders.WatchSaga(pb.WatchSagaRequest(saga_id=refund), timeout=TIMEOUT):
            pass
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # The refused abort changed nothing; the owner can still read and abort its saga.
    saga = (await payments.GetSaga(pb.GetSagaRequest(saga_id=refund), timeout=TIMEOUT)).saga
    assert saga.state == pb.SAGA_STATE_RUNNING, saga
    aborted = await payments.AbortSaga(pb.AbortSagaRequest(saga_id=refund, reason="ops"), timeout=TIMEOUT)
    assert aborted.saga.state != pb.SAGA_STATE_RUNNING


async def test_lists_show_only_the_sagas_the_caller_may_see(
    stubs: dict[str, saga_pb2_grpc.SagaCoordinatorStub],
) -> None:
    orders, payments = stubs["orders"], stubs["payments"]
    mine = await _start(orders, "place-order")
    theirs = await _start(payments, "refund")

    listed = await orders.ListSagas(pb.ListSagasRequest(page_size=1000), timeout=TIMEOUT)
    names = {saga.definition_name for saga in listed.sagas}
    ids = {saga.saga_id for saga in listed.sagas}
    assert mine in ids and theirs not in ids
    assert names == {"place-order"}, names
    await _denied(orders.ListSagas(pb.ListSagasRequest(definition_name="refund"), timeout=TIMEOUT))
    # Its own saga stays fully readable.
    own = await orders.GetSaga(pb.GetSagaRequest(saga_id=mine), timeout=TIMEOUT)
    assert own.saga.definition_name == "place-order"


async def _open_group(channel: grpc.aio.Channel, group: str) -> grpc.StatusCode:
    """Open a group subscription on payments.charged; OK once the server accepted it (a first read)."""
    opened = bus_pb2.SubscribeRequest(
        open=bus_pb2.SubscriptionOptions(
            topic="payments.charged", group=group, start=bus_pb2.StartPosition(earliest=True)
        )
    )
    # Written without a half-close, which could race the server's refusal (see tests.support.streams).
    call = bus_pb2_grpc.BusStub(channel).Subscribe(timeout=3.0)
    try:
        await call.write(opened)
        await call.read()
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        call.cancel()
    return grpc.StatusCode.OK


async def test_an_identity_cannot_join_or_drain_another_identitys_consumer_group(plane: Plane) -> None:
    orders = aio_channel(plane.address, plane.security("orders"))
    payments = aio_channel(plane.address, plane.security("payments"))
    try:
        await bus_pb2_grpc.BusStub(payments).Publish(
            bus_pb2.PublishRequest(topic="payments.charged", messages=[bus_pb2.BusMessage(payload=b"c1")]),
            timeout=TIMEOUT,
        )
        assert await _open_group(payments, "payments-ledger") == grpc.StatusCode.OK
        assert await _open_group(orders, "payments-ledger") == grpc.StatusCode.PERMISSION_DENIED
        assert await _open_group(orders, "orders-audit") == grpc.StatusCode.OK
        for request in (
            bus_pb2.ListDeadLettersRequest(topic="payments.charged", group="payments-ledger"),
            bus_pb2.ListDeadLettersRequest(topic="payments.charged"),
        ):
            await _denied(bus_pb2_grpc.BusStub(orders).ListDeadLetters(request, timeout=TIMEOUT))
        await _denied(
            bus_pb2_grpc.BusStub(orders).ReplayDeadLetters(
                bus_pb2.ReplayDeadLettersRequest(topic="payments.charged", group="payments-ledger"),
                timeout=TIMEOUT,
            )
        )
    finally:
        await orders.close()
        await payments.close()


def _definition(*targets: tuple[str, str, str]) -> pb.SagaDefinition:
    return pb.SagaDefinition(
        name="place-order",
        steps=[
            pb.SagaStep(
                name=f"s{index}",
                service=service,
                method=f"/shop.v1.Api/{method}",
                compensation_method=f"/shop.v1.Api/{undo}" if undo else "",
                no_compensation=not undo,
            )
            for index, (service, method, undo) in enumerate(targets)
        ],
    )


async def test_saga_steps_may_only_call_what_the_defining_identity_may_have_called(
    stubs: dict[str, saga_pb2_grpc.SagaCoordinatorStub],
) -> None:
    orders = stubs["orders"]
    foreign = _definition(("inventory", "Reserve", "Release"), ("payments", "Charge", ""))
    for request in (
        orders.StartSaga(pb.StartSagaRequest(definition=foreign), timeout=TIMEOUT),
        orders.RegisterDefinition(pb.RegisterDefinitionRequest(definition=foreign), timeout=TIMEOUT),
    ):
        reason = await _denied(request)
        assert "payments/Charge" in reason, reason
    # A compensation is a call too.
    undo = _definition(("payments", "Refund", "Charge"))
    await _denied(orders.RegisterDefinition(pb.RegisterDefinitionRequest(definition=undo), timeout=TIMEOUT))

    allowed = _definition(("inventory", "Reserve", "Release"), ("payments", "Refund", ""))
    registered = await orders.RegisterDefinition(
        pb.RegisterDefinitionRequest(definition=allowed), timeout=TIMEOUT
    )
    assert registered.definition.version >= 1
    # Nothing was stored by the refused requests: the latest version is the allowed one.
    latest = await orders.GetDefinition(pb.GetDefinitionRequest(name="place-order"), timeout=TIMEOUT)
    assert [step.service for step in latest.definition.steps] == ["inventory", "payments"]
