"""Limits: message and metadata size, calls per connection and identity, watch and subscription caps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from rpcmesh.v1 import eventstore_pb2, eventstore_pb2_grpc, registry_pb2, registry_pb2_grpc

from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.controlplane.eventstore.component import EventStoreComponent
from rpcmesh.controlplane.registry.component import RegistryComponent
from rpcmesh.controlplane.server import ControlPlane
from rpcmesh.security.client import ClientSecurity, aio_channel
from rpcmesh.security.limits import Limits
from rpcmesh.security.settings import SecuritySettings
from rpcmesh.security.tls import ClientTlsConfig, ServerTlsConfig
from tests.integration.security.conftest import Channels, Pki

TIMEOUT = 10.0
# Separate TCP connections per channel (grpc shares subchannels between equal channels otherwise).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_oversized_message_and_metadata_are_refused(tls_plane: str, channels: Channels) -> None:
    registry = registry_pb2_grpc.RegistryStub(channels.as_identity(tls_plane, "order-service"))
    huge = registry_pb2.RegisterRequest(
        instance=registry_pb2.Instance(
            service="order-service", address="127.0.0.1:9", metadata={"k": "x" * 1_700_000}
        ),
        ttl=duration_pb2.Duration(seconds=30),
    )
    assert await _code(registry.Register(huge, timeout=TIMEOUT)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    big_headers = (("x-padding", "y" * 40_000),)
    code = await _code(
        registry.Resolve(registry_pb2.ResolveRequest(service="a"), metadata=big_headers, timeout=TIMEOUT)
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The server is fine afterwards.
    await registry.Resolve(registry_pb2.ResolveRequest(service="order-service"), timeout=TIMEOUT)


@pytest.fixture
async def small_plane(tmp_path: Path, pki: Pki) -> AsyncIterator[tuple[ControlPlane, str]]:
    limits = Limits(
        max_calls_per_connection=4,
        max_calls_per_identity=6,
        max_watches_per_identity=2,
        max_subscriptions_per_identity=2,
        max_leases_per_identity=2,
    )
    security = SecuritySettings(
        tls=ServerTlsConfig(cert_file=pki.folder / "server.crt", key_file=pki.folder / "server.key"),
        token_secret_file=pki.folder / "token.secret",
        policy_file=pki.folder / "policy.yaml",
        limits=limits,
    )
    config = ControlPlaneConfig(port=0, data_dir=tmp_path / "data", grace=0.5, security=security)
    plane = ControlPlane(config, components=[RegistryComponent(config), EventStoreComponent(config)])
    address = await plane.start()
    try:
        yield plane, address
    finally:
        await plane.stop()


async def _first(call: grpc.aio.UnaryStreamCall) -> grpc.StatusCode:
    """Read the first response of a server stream: OK when it arrives, else the status."""
    try:
        await call.read()
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    code = await call.code() if call.done() else grpc.StatusCode.OK
    return code


async def test_caps_per_identity_and_connection(small_plane: tuple[ControlPlane, str], pki: Pki) -> None:
    plane, address = small_plane
    opened: list[grpc.aio.Channel] = []

    def channel(identity: str) -> grpc.aio.Channel:
        security = ClientSecurity(tls=ClientTlsConfig(ca_file=pki.ca), token=pki.token(identity))
        opened.append(aio_channel(address, security, options=OWN_CONNECTION))
        return opened[-1]

    calls: list[grpc.aio.Call] = []
    try:
        order = registry_pb2_grpc.RegistryStub(channel("order-service"))
        watches = [order.Watch(registry_pb2.WatchRequest(), timeout=TIMEOUT) for _ in range(3)]
        calls += watches
        codes = [await _first(call) for call in watches]
        assert sorted(code.name for code in codes) == ["OK", "OK", "RESOURCE_EXHAUSTED"]
        # Closing a watch frees its slot.
        ok = [call for call, code in zip(watches, codes, strict=True) if code == grpc.StatusCode.OK]
        ok[0].cancel()
        await asyncio.sleep(0.2)
        again = order.Watch(registry_pb2.WatchRequest(), timeout=TIMEOUT)
        calls.append(again)
        assert await _first(again) == grpc.StatusCode.OK

        events = eventstore_pb2_grpc.EventStoreStub(channel("order-service"))
        subs = [
            events.SubscribeToStream(
                eventstore_pb2.SubscribeToStreamRequest(stream="order-9", after_revision=-1)
            )
            for _ in range(3)
        ]
        calls += subs
        codes = [await _first(call) for call in subs]
        assert sorted(code.name for code in codes) == ["OK", "OK", "RESOURCE_EXHAUSTED"]

        # Per connection: the admin has no identity-specific headroom problem, but one
        # connection carries at most 4 calls at once.
        admin = registry_pb2_grpc.RegistryStub(channel("ops"))
        admin_events = eventstore_pb2_grpc.EventStoreStub(opened[-1])
        admin_calls = [admin.Watch(registry_pb2.WatchRequest(), timeout=TIMEOUT) for _ in range(2)] + [
            admin_events.SubscribeToAll(eventstore_pb2.SubscribeToAllRequest(), timeout=TIMEOUT)
            for _ in range(2)
        ]
        calls += admin_calls
        assert [await _first(call) for call in admin_calls] == [grpc.StatusCode.OK] * 4
        fifth = admin.Resolve(registry_pb2.ResolveRequest(service="x"), timeout=TIMEOUT)
        assert await _code(fifth) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Another connection of the same identity still works.
        other = registry_pb2_grpc.RegistryStub(channel("ops"))
        await other.Resolve(registry_pb2.ResolveRequest(service="x"), timeout=TIMEOUT)
        # order-service holds 2 watches and 2 subscriptions of its 6 calls in flight.
        assert plane.security is not None
        assert plane.security.interceptor.tracker.in_flight(identity="order-service") == 4
    finally:
        for call in calls:
            call.cancel()
        for opened_channel in opened:
            await opened_channel.close()
    # Every slot is released once the calls end.
    assert plane.security is not None
    for _ in range(50):
        if plane.security.interceptor.tracker.in_flight() == 0:
            break
        await asyncio.sleep(0.1)
    assert plane.security.interceptor.tracker.in_flight() == 0


def lease_request(instance_id: str) -> registry_pb2.RegisterRequest:
    """Register ``instance_id`` of order-service for 30 s."""
    return registry_pb2.RegisterRequest(
        instance=registry_pb2.Instance(
            service="order-service", instance_id=instance_id, address="127.0.0.1:9"
        ),
        ttl=duration_pb2.Duration(seconds=30),
    )


async def test_leases_per_identity_are_capped_and_owned(
    small_plane: tuple[ControlPlane, str], pki: Pki
) -> None:
    _, address = small_plane
    security = ClientSecurity(tls=ClientTlsConfig(ca_file=pki.ca), token=pki.token("order-service"))
    async with aio_channel(address, security, options=OWN_CONNECTION) as channel:
        registry = registry_pb2_grpc.RegistryStub(channel)

        register = lease_request

        first = await registry.Register(register("o-1"), timeout=TIMEOUT)
        await registry.Register(register("o-2"), timeout=TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as third:
            await registry.Register(register("o-3"), timeout=TIMEOUT)
        assert third.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "order-service" in (third.value.details() or "")
        # Updating an instance it holds is not a new lease.
        update = register("o-1")
        update.lease_token = first.lease_token
        update.instance.version = "2"
        await registry.Register(update, timeout=TIMEOUT)
        resolved = await registry.Resolve(
            registry_pb2.ResolveRequest(service="order-service"), timeout=TIMEOUT
        )
        assert sorted(i.instance_id for i in resolved.instances) == ["o-1", "o-2"]
        assert {i.owner for i in resolved.instances} == {"order-service"}
        # Deregistering frees a lease.
        await registry.Deregister(
            registry_pb2.DeregisterRequest(
                service="order-service", instance_id="o-1", lease_token=first.lease_token
            ),
            timeout=TIMEOUT,
        )
        await registry.Register(register("o-3"), timeout=TIMEOUT)


async def test_concurrent_registrations_cannot_exceed_the_lease_cap(
    small_plane: tuple[ControlPlane, str], pki: Pki
) -> None:
    # The cap was checked against the node's view before the write committed: Registers arriving
    # together all passed the check. Four at once (the connection's call cap), cap 2, ten rounds.
    _, address = small_plane
    security = ClientSecurity(tls=ClientTlsConfig(ca_file=pki.ca), token=pki.token("order-service"))
    async with aio_channel(address, security, options=OWN_CONNECTION) as channel:
        registry = registry_pb2_grpc.RegistryStub(channel)
        for round_ in range(10):
            requests = [lease_request(f"r{round_}-{i}") for i in range(4)]
            outcomes = await asyncio.gather(
                *(registry.Register(r, timeout=TIMEOUT) for r in requests), return_exceptions=True
            )
            held = [o for o in outcomes if isinstance(o, registry_pb2.RegisterResponse)]
            refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            assert len(held) == 2, f"round {round_}: {len(held)} leases granted with a cap of 2"
            assert [e.code() for e in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
            for request, outcome in zip(requests, outcomes, strict=True):
                if isinstance(outcome, registry_pb2.RegisterResponse):
                    await registry.Deregister(
                        registry_pb2.DeregisterRequest(
                            service="order-service",
                            instance_id=request.instance.instance_id,
                            lease_token=outcome.lease_token,
                        ),
                        timeout=TIMEOUT,
                    )
