"""Authentication and authorization failures against a real `rpcmesh up` with TLS, tokens and a policy."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpcmesh.v1 import (
    bus_pb2,
    bus_pb2_grpc,
    eventstore_pb2,
    eventstore_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    saga_pb2,
    saga_pb2_grpc,
)

from rpcmesh.security.tokens import mint_token
from tests.integration.security.conftest import Channels, Pki
from tests.support.streams import stream_status

TIMEOUT = 10.0


def _register(service: str, instance_id: str = "") -> registry_pb2.RegisterRequest:
    return registry_pb2.RegisterRequest(
        instance=registry_pb2.Instance(service=service, instance_id=instance_id, address="127.0.0.1:9"),
        ttl=duration_pb2.Duration(seconds=30),
    )


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _stream_code(call: grpc.aio.Call) -> grpc.StatusCode:
    try:
        async for _ in call:  # type: ignore[attr-defined]
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_missing_and_invalid_tokens_are_unauthenticated(
    tls_plane: str, pki: Pki, channels: Channels
) -> None:
    wrong_secret = mint_token(b"x" * 32, subject="ops", issuer="rpcmesh", ttl=60)
    wrong_issuer = mint_token(pki.secret, subject="ops", issuer="someone-else", ttl=60)
    expired = pki.token("ops", ttl=1, now=time.time() - 3600)
    for token in [None, "garbage", wrong_secret, wrong_issuer, expired]:
        channel = channels.tls(tls_plane, token)
        registry = registry_pb2_grpc.RegistryStub(channel)
        assert await _code(registry.Resolve(registry_pb2.ResolveRequest(service="a"), timeout=TIMEOUT)) == (
            grpc.StatusCode.UNAUTHENTICATED
        ), token
        assert await _code(registry.Register(_register("order-service"), timeout=TIMEOUT)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        watch = registry.Watch(registry_pb2.WatchRequest(), timeout=TIMEOUT)
        assert await _stream_code(watch) == grpc.StatusCode.UNAUTHENTICATED
        # Refused on arrival, so nothing is written (see tests.support.streams).
        assert await stream_status(registry.KeepAlive, deadline=TIMEOUT) == grpc.StatusCode.UNAUTHENTICATED
        subscribe = bus_pb2_grpc.BusStub(channel).Subscribe
        assert await stream_status(subscribe, deadline=TIMEOUT) == grpc.StatusCode.UNAUTHENTICATED


async def test_health_needs_no_credentials_and_plaintext_cannot_connect(
    tls_plane: str, channels: Channels
) -> None:
    health = health_pb2_grpc.HealthStub(channels.tls(tls_plane))
    response = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    plain = registry_pb2_grpc.RegistryStub(channels.plaintext(tls_plane))
    assert await _code(plain.Resolve(registry_pb2.ResolveRequest(service="a"), timeout=3)) == (
        grpc.StatusCode.UNAVAILABLE
    )


async def test_registry_own_service_only(tls_plane: str, channels: Channels) -> None:
    order = registry_pb2_grpc.RegistryStub(channels.as_identity(tls_plane, "order-service"))
    reader = registry_pb2_grpc.RegistryStub(channels.as_identity(tls_plane, "reader"))
    admin = registry_pb2_grpc.RegistryStub(channels.as_identity(tls_plane, "ops"))
    stranger = registry_pb2_grpc.RegistryStub(channels.as_identity(tls_plane, "stranger"))

    mine = await order.Register(_register("order-service"), timeout=TIMEOUT)
    assert await _code(order.Register(_register("payment-service"), timeout=TIMEOUT)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert (
        await _code(reader.Register(_register("reader"), timeout=TIMEOUT))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert await _code(stranger.Resolve(registry_pb2.ResolveRequest(service="x"), timeout=TIMEOUT)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # Nothing changed: the refused registration is not there.
    resolved = await admin.Resolve(
        registry_pb2.ResolveRequest(service="payment-service", include_unhealthy=True), timeout=TIMEOUT
    )
    assert list(resolved.instances) == []

    # Deregistering or reporting for another service is refused even with the right token.
    deregister = registry_pb2.DeregisterRequest(
        service="payment-service", instance_id=mine.instance_id, lease_token=mine.lease_token
    )
    assert await _code(order.Deregister(deregister, timeout=TIMEOUT)) == grpc.StatusCode.PERMISSION_DENIED
    # Renewing needs an identity that may register at all; for the reader it is refused on the stream.
    heartbeat = registry_pb2.HeartbeatRequest(lease_id=mine.lease_id, lease_token=mine.lease_token)
    assert await _code(reader.Heartbeat(heartbeat, timeout=TIMEOUT)) == grpc.StatusCode.PERMISSION_DENIED
    renewal = registry_pb2.KeepAliveRequest(lease_id=mine.lease_id, lease_token=mine.lease_token)
    assert (
        await stream_status(reader.KeepAlive, renewal, deadline=TIMEOUT) == grpc.StatusCode.PERMISSION_DENIED
    )
    await order.Heartbeat(heartbeat, timeout=TIMEOUT)
    # Discovery is open to listed identities by default.
    found = await reader.Resolve(
        registry_pb2.ResolveRequest(service="order-service", include_unhealthy=True), timeout=TIMEOUT
    )
    assert [i.instance_id for i in found.instances] == [mine.instance_id]
    await order.Deregister(
        registry_pb2.DeregisterRequest(
            service="order-service", instance_id=mine.instance_id, lease_token=mine.lease_token
        ),
        timeout=TIMEOUT,
    )


async def test_bus_topics(tls_plane: str, channels: Channels) -> None:
    order = bus_pb2_grpc.BusStub(channels.as_identity(tls_plane, "order-service"))
    admin = bus_pb2_grpc.BusStub(channels.as_identity(tls_plane, "ops"))
    message = bus_pb2.BusMessage(id="m1", payload=b"x")
    published = await order.Publish(
        bus_pb2.PublishRequest(topic="orders.created", messages=[message]), timeout=TIMEOUT
    )
    assert len(published.results) == 1
    denied = bus_pb2.PublishRequest(
        topic="payments.done", messages=[bus_pb2.BusMessage(id="m2", payload=b"x")]
    )
    assert await _code(order.Publish(denied, timeout=TIMEOUT)) == grpc.StatusCode.PERMISSION_DENIED
    # A message naming another topic inside an allowed request is refused too.
    smuggled = bus_pb2.PublishRequest(
        topic="orders.created", messages=[bus_pb2.BusMessage(id="m3", topic="payments.done", payload=b"x")]
    )
    assert await _code(order.Publish(smuggled, timeout=TIMEOUT)) == grpc.StatusCode.PERMISSION_DENIED
    event = bus_pb2.PublishEventRequest(event_type="payment-failed", data=b"x")
    assert await _code(order.PublishEvent(event, timeout=TIMEOUT)) == grpc.StatusCode.PERMISSION_DENIED
    assert await _code(
        order.DeleteTopic(bus_pb2.DeleteTopicRequest(name="orders.created"), timeout=TIMEOUT)
    ) == (grpc.StatusCode.PERMISSION_DENIED)
    assert await _code(order.ListTopics(bus_pb2.ListTopicsRequest(), timeout=TIMEOUT)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    topics = await admin.ListTopics(bus_pb2.ListTopicsRequest(), timeout=TIMEOUT)
    assert "payments.done" not in {topic.name for topic in topics.topics}

    # Subscribing: the open is checked, and so is every later ack on the stream.
    wide = bus_pb2.SubscribeRequest(open=bus_pb2.SubscriptionOptions(topic=">", group="g"))
    assert await stream_status(order.Subscribe, wide, deadline=TIMEOUT) == grpc.StatusCode.PERMISSION_DENIED

    outgoing: asyncio.Queue[bus_pb2.SubscribeRequest | None] = asyncio.Queue()

    async def requests():  # type: ignore[no-untyped-def]
        while (item := await outgoing.get()) is not None:
            yield item

    call = order.Subscribe(requests(), timeout=TIMEOUT)
    await outgoing.put(
        bus_pb2.SubscribeRequest(
            open=bus_pb2.SubscriptionOptions(
                topic="orders.created", group="order-service", start=bus_pb2.StartPosition(earliest=True)
            )
        )
    )
    first = await call.read()
    assert first is not grpc.aio.EOF
    await outgoing.put(
        bus_pb2.SubscribeRequest(ack=bus_pb2.Ack(refs=[bus_pb2.MessageRef(topic="payments.x.y", sequence=1)]))
    )
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError:
        pass
    assert await call.code() == grpc.StatusCode.PERMISSION_DENIED
    await outgoing.put(None)


async def test_sagas_and_streams(tls_plane: str, channels: Channels) -> None:
    sagas = saga_pb2_grpc.SagaCoordinatorStub(channels.as_identity(tls_plane, "order-service"))
    start = saga_pb2.StartSagaRequest(definition_name="refund", idempotency_key="k1")
    assert await _code(sagas.StartSaga(start, timeout=TIMEOUT)) == grpc.StatusCode.PERMISSION_DENIED
    inline = saga_pb2.StartSagaRequest(
        definition=saga_pb2.SagaDefinition(name="refund"), idempotency_key="k2"
    )
    assert await _code(sagas.StartSaga(inline, timeout=TIMEOUT)) == grpc.StatusCode.PERMISSION_DENIED
    # Listing every saga is allowed, and shows only the definitions the policy covers.
    listed = await sagas.ListSagas(saga_pb2.ListSagasRequest(), timeout=TIMEOUT)
    assert {saga.definition_name for saga in listed.sagas} <= {"place-order"}
    assert await _code(
        sagas.ListSagas(saga_pb2.ListSagasRequest(definition_name="refund"), timeout=TIMEOUT)
    ) == (grpc.StatusCode.PERMISSION_DENIED)

    events = eventstore_pb2_grpc.EventStoreStub(channels.as_identity(tls_plane, "order-service"))
    admin = eventstore_pb2_grpc.EventStoreStub(channels.as_identity(tls_plane, "ops"))
    data = [eventstore_pb2.EventData(event_type="placed", data=b"{}")]
    await events.AppendToStream(
        eventstore_pb2.AppendToStreamRequest(
            stream="order-1", expected_state=eventstore_pb2.EXPECTED_STATE_ANY, events=data
        ),
        timeout=TIMEOUT,
    )
    foreign = eventstore_pb2.AppendToStreamRequest(
        stream="payment-1", expected_state=eventstore_pb2.EXPECTED_STATE_ANY, events=data
    )
    assert await _code(events.AppendToStream(foreign, timeout=TIMEOUT)) == grpc.StatusCode.PERMISSION_DENIED
    read = eventstore_pb2.ReadStreamRequest(
        stream="payment-1", direction=eventstore_pb2.READ_DIRECTION_FORWARDS
    )
    assert await _code(events.ReadStream(read, timeout=TIMEOUT)) == grpc.StatusCode.PERMISSION_DENIED
    assert await _code(events.ReadAll(eventstore_pb2.ReadAllRequest(), timeout=TIMEOUT)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    subscription = events.SubscribeToStream(
        eventstore_pb2.SubscribeToStreamRequest(stream="payment-1"), timeout=TIMEOUT
    )
    assert await _stream_code(subscription) == grpc.StatusCode.PERMISSION_DENIED
    own = await events.ReadAll(
        eventstore_pb2.ReadAllRequest(filter=eventstore_pb2.ReadAllFilter(stream_prefixes=["order-"])),
        timeout=TIMEOUT,
    )
    assert {event.stream for event in own.events} == {"order-1"}
    everything = await admin.ReadAll(eventstore_pb2.ReadAllRequest(), timeout=TIMEOUT)
    assert "payment-1" not in {event.stream for event in everything.events}


async def test_mtls_certificate_is_the_identity(mtls_plane: str, pki: Pki, channels: Channels) -> None:
    order = registry_pb2_grpc.RegistryStub(channels.mtls(mtls_plane, pki.client("order-service")))
    mine = await order.Register(_register("order-service"), timeout=TIMEOUT)
    assert mine.instance_id
    assert await _code(order.Register(_register("payment-service"), timeout=TIMEOUT)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # A token overrides the certificate's identity, and an invalid one is refused outright.
    as_admin = registry_pb2_grpc.RegistryStub(
        channels.mtls(mtls_plane, pki.client("order-service"), token=pki.token("ops"))
    )
    await as_admin.Register(_register("payment-service"), timeout=TIMEOUT)
    bad = registry_pb2_grpc.RegistryStub(channels.mtls(mtls_plane, pki.client("order-service"), token="bad"))
    assert (
        await _code(bad.Register(_register("order-service"), timeout=TIMEOUT))
        == grpc.StatusCode.UNAUTHENTICATED
    )


@pytest.mark.parametrize("which", ["none", "foreign", "expired"])
async def test_mtls_handshake_fails_without_a_valid_client_certificate(
    mtls_plane: str, pki: Pki, channels: Channels, which: str
) -> None:
    from rpcmesh.security.tls import ClientTlsConfig

    if which == "none":
        tls = ClientTlsConfig(ca_file=pki.ca)
    else:
        tls = ClientTlsConfig(
            ca_file=pki.ca,
            cert_file=pki.folder / f"client-{which}.crt",
            key_file=pki.folder / f"client-{which}.key",
        )
    stub = health_pb2_grpc.HealthStub(channels.mtls(mtls_plane, tls))
    assert await _code(stub.Check(health_pb2.HealthCheckRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("which", ["foreign-ca", "wrong-name"])
async def test_client_refuses_a_server_it_cannot_verify(
    tls_plane: str, pki: Pki, channels: Channels, which: str
) -> None:
    from rpcmesh.security.tls import ClientTlsConfig

    if which == "foreign-ca":
        tls = ClientTlsConfig(ca_file=pki.folder / "foreign-ca.crt")
    else:
        tls = ClientTlsConfig(ca_file=pki.ca, server_name="not-the-server.example")
    stub = health_pb2_grpc.HealthStub(channels.mtls(tls_plane, tls))
    assert await _code(stub.Check(health_pb2.HealthCheckRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE


async def test_client_refuses_expired_server_certificate(pki: Pki, channels: Channels) -> None:
    from rpcmesh.security.tls import ClientTlsConfig, ServerTlsConfig, server_credentials

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(
        __import__("grpc_health.v1.health", fromlist=["x"]).aio.HealthServicer(), server
    )
    credentials = server_credentials(
        ServerTlsConfig(
            cert_file=pki.folder / "client-expired.crt", key_file=pki.folder / "client-expired.key"
        )
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        stub = health_pb2_grpc.HealthStub(channels.mtls(f"127.0.0.1:{port}", ClientTlsConfig(ca_file=pki.ca)))
        assert (
            await _code(stub.Check(health_pb2.HealthCheckRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
        )
    finally:
        await server.stop(0)
