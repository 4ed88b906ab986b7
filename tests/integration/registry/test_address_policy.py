"""The address policy over the wire: refused addresses get PERMISSION_DENIED and change nothing.

Against a real `rpcmesh up` (the default policy, and its --allow-address and
--allow-link-local-addresses flags), and against a RegistryComponent in-process with a real SQLite
store and a real grpc.aio server on port 0. The prober never contacts a stored address the policy refuses.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from rpcmesh.controlplane import ControlPlane, ControlPlaneConfig
from rpcmesh.controlplane.registry import AddressPolicy, RegistryComponent, RegistrySettings
from rpcmesh.controlplane.registry.address_policy import ERROR_REASON
from tests.integration.registry.helpers import eventually, ttl
from tests.support.processes import ManagedProcess

# Refused by the default policy, with the rule the refusal names.
REFUSED_BY_DEFAULT = [
    ("169.254.169.254:80", "a cloud metadata endpoint"),
    ("169.254.170.2:80", "a cloud metadata endpoint"),
    ("[fd00:ec2::254]:80", "a cloud metadata endpoint"),
    ("[::ffff:169.254.169.254]:80", "a cloud metadata endpoint (the IPv6 form of 169.254.169.254)"),
    ("metadata.google.internal:80", "a cloud metadata host name"),
    ("169.254.1.1:8080", "a link-local address"),
    ("[fe80::1]:80", "a link-local address"),
    ("0.0.0.0:80", "an unspecified address"),
    ("[::]:80", "an unspecified address"),
    ("224.0.0.1:80", "a multicast address"),
    ("255.255.255.255:80", "the broadcast address"),
]


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The google.rpc.ErrorInfo detail of a failed call, if it has one."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


def register_request(
    service: str, address: str, lease_token: str = "", instance_id: str = ""
) -> registry_pb2.RegisterRequest:
    return registry_pb2.RegisterRequest(
        instance=registry_pb2.Instance(service=service, address=address, instance_id=instance_id),
        ttl=ttl(60),
        lease_token=lease_token,
    )


async def refused(
    stub: registry_pb2_grpc.RegistryStub, request: registry_pb2.RegisterRequest
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Register(request, timeout=10)
    return caught.value


async def test_up_refuses_metadata_and_link_local_addresses_and_changes_nothing(
    control_plane: tuple[ManagedProcess, str],
) -> None:
    _, address = control_plane
    async with grpc.aio.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        watch = stub.Watch(registry_pb2.WatchRequest())
        snapshot = await watch.read()
        assert isinstance(snapshot, registry_pb2.WatchResponse) and snapshot.snapshot
        start = snapshot.revision

        for bad, rule in REFUSED_BY_DEFAULT:
            error = await refused(stub, register_request("echo", bad))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (bad, error)
            assert (error.details() or "").startswith(f"instance.address: {bad!r} is not allowed: {rule}"), (
                bad
            )
            info = error_info(error)
            assert info is not None and info.reason == ERROR_REASON, (bad, info)
            assert info.metadata["address"] == bad and info.metadata["rule"].startswith(rule), (bad, info)
        # A numeric spelling of the metadata address is malformed, not a host name.
        error = await refused(stub, register_request("echo", "2852039166:80"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.details() or "").startswith("instance.address:")

        # Nothing was registered and no event was written.
        resolved = await stub.Resolve(registry_pb2.ResolveRequest(service="echo", include_unhealthy=True))
        assert list(resolved.instances) == [] and resolved.revision == start
        listed = await stub.ListServices(registry_pb2.ListServicesRequest())
        assert list(listed.services) == []

        good = await stub.Register(register_request("echo", "127.0.0.1:5000", instance_id="good"), timeout=10)
        assert good.revision == start + 1
        first = await watch.read()
        assert isinstance(first, registry_pb2.WatchResponse)
        assert [(event.revision, event.instance.address) for event in first.events] == [
            (start + 1, "127.0.0.1:5000")
        ]

        # The lease holder cannot move its instance to a refused address either.
        error = await refused(
            stub,
            register_request("echo", "169.254.169.254:80", lease_token=good.lease_token, instance_id="good"),
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        resolved = await stub.Resolve(registry_pb2.ResolveRequest(service="echo", include_unhealthy=True))
        assert [(item.instance_id, item.address) for item in resolved.instances] == [
            ("good", "127.0.0.1:5000")
        ]
        assert resolved.revision == start + 1
        watch.cancel()


ALLOW = AddressPolicy(allow=("127.0.0.0/8", "10.0.0.0/8", "fd00:1::/32", "*.svc.cluster.local"))
ALLOWED_POOL = [
    "127.0.0.1:{port}",
    "10.1.2.3:{port}",
    "[fd00:1::7]:{port}",
    "[::ffff:10.9.9.9]:{port}",
    "echo.prod.svc.cluster.local:{port}",
]
REFUSED_POOL = [
    "192.168.1.1:{port}",  # private, but not in the list
    "[::1]:{port}",  # loopback, but not in the list
    "localhost:{port}",  # a host name no glob matches
    "svc.cluster.local:{port}",
    "169.254.169.254:{port}",
    "[::ffff:169.254.169.254]:{port}",
    "169.254.1.1:{port}",
    "metadata.google.internal:{port}",
    "0.0.0.0:{port}",
]


@pytest.fixture
async def allow_list_registry(tmp_path: Path) -> AsyncIterator[registry_pb2_grpc.RegistryStub]:
    config = ControlPlaneConfig(port=0, data_dir=tmp_path)
    settings = RegistrySettings(address_policy=ALLOW, probes_enabled=False)
    plane = ControlPlane(config, components=[RegistryComponent(config, settings)])
    address = await plane.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            yield registry_pb2_grpc.RegistryStub(channel)
    finally:
        await plane.stop()


async def test_allow_list_is_the_only_set_allowed(
    allow_list_registry: registry_pb2_grpc.RegistryStub,
) -> None:
    stub = allow_list_registry
    for template in ALLOWED_POOL:
        await stub.Register(register_request("fixed", template.format(port=80)), timeout=10)
    for template in REFUSED_POOL:
        bad = template.format(port=80)
        error = await refused(stub, register_request("fixed", bad))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (bad, error)
    resolved = await stub.Resolve(registry_pb2.ResolveRequest(service="fixed", include_unhealthy=True))
    assert sorted(item.address for item in resolved.instances) == sorted(
        t.format(port=80) for t in ALLOWED_POOL
    )


SEEDS = [11, 29, 4242, *range(9000, 9017)]
"""20 trials on one registry (each in a service of its own)."""
REQUESTS = 40


async def test_refused_registrations_interleaved_at_random_change_nothing(
    allow_list_registry: registry_pb2_grpc.RegistryStub,
) -> None:
    """Refused and accepted Registers (new ones and moves of existing ones) race in a random order.

    After each trial the registry holds exactly the accepted ones at their accepted addresses,
    and the event log since the trial began holds exactly one PUT per accepted request.
    """
    for seed in SEEDS:
        await _interleaved_trial(allow_list_registry, seed)


async def _interleaved_trial(stub: registry_pb2_grpc.RegistryStub, seed: int) -> None:
    rng = random.Random(seed)
    service = f"svc-{seed}"
    # A few instances first, whose holders later try to move them (to allowed or refused addresses).
    held: dict[str, registry_pb2.RegisterResponse] = {}
    for index in range(5):
        held[f"held-{index}"] = await stub.Register(
            register_request(service, f"127.0.0.1:{6000 + index}", instance_id=f"held-{index}"), timeout=10
        )
    start = held["held-4"].revision
    plan: list[tuple[str, str, str, bool]] = []  # (instance_id, address, lease_token, allowed)
    moved: set[str] = set()
    for index in range(REQUESTS):
        allowed = rng.random() < 0.5
        address = rng.choice(ALLOWED_POOL if allowed else REFUSED_POOL).format(port=rng.randint(1, 65535))
        if rng.random() < 0.3 and len(moved) < len(held):
            instance_id = rng.choice(sorted(set(held) - moved))
            moved.add(instance_id)  # one move per instance, so the final address is known
            plan.append((instance_id, address, held[instance_id].lease_token, allowed))
        else:
            plan.append((f"new-{index}", address, "", allowed))
    context = f"seed={seed} plan={plan}"

    async def attempt(instance_id: str, address: str, token: str) -> grpc.StatusCode:
        await asyncio.sleep(rng.random() * 0.05)
        try:
            await stub.Register(register_request(service, address, token, instance_id), timeout=20)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(attempt(i, a, t) for i, a, t, _ in plan))
    for (instance_id, address, _, allowed), code in zip(plan, codes, strict=True):
        expected = grpc.StatusCode.OK if allowed else grpc.StatusCode.PERMISSION_DENIED
        assert code == expected, f"{instance_id} {address}: {code}; {context}"

    expected_addresses = {instance_id: f"127.0.0.1:{6000 + int(instance_id[5:])}" for instance_id in held}
    for instance_id, address, _, allowed in plan:
        if allowed:
            expected_addresses[instance_id] = address
    resolved = await stub.Resolve(registry_pb2.ResolveRequest(service=service, include_unhealthy=True))
    assert {item.instance_id: item.address for item in resolved.instances} == expected_addresses, context
    accepted = sum(1 for *_, allowed in plan if allowed)
    assert resolved.revision == start + accepted, context

    watch = stub.Watch(registry_pb2.WatchRequest(service=service, after_revision=start))
    seen: list[registry_pb2.WatchEvent] = []
    while len(seen) < accepted:
        response = await asyncio.wait_for(watch.read(), 10)
        assert isinstance(response, registry_pb2.WatchResponse), context
        seen.extend(response.events)
    watch.cancel()
    refused_addresses = {address for _, address, _, allowed in plan if not allowed}
    assert len(seen) == accepted, context
    assert not {event.instance.address for event in seen} & refused_addresses, context


class _CountingHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 that counts the Checks it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        self.checks += 1
        return await super().Check(request, context)


async def _plane(data_dir: Path, settings: RegistrySettings) -> tuple[ControlPlane, str]:
    config = ControlPlaneConfig(port=0, data_dir=data_dir)
    plane = ControlPlane(config, components=[RegistryComponent(config, settings)])
    return plane, await plane.start()


async def test_prober_never_contacts_a_stored_address_the_policy_now_refuses(tmp_path: Path) -> None:
    """An instance stored under a looser policy is never probed by a stricter node: it turns CRITICAL."""
    health_servicer = _CountingHealth()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        check = registry_pb2.GrpcHealthCheck(interval=ttl(0.2), timeout=ttl(0.2))
        request = registry_pb2.RegisterRequest(
            instance=registry_pb2.Instance(service="probed", address=f"127.0.0.1:{port}", health_check=check),
            ttl=ttl(120),
        )
        # Stored under the default policy, by a node that does not probe.
        plane, address = await _plane(tmp_path, RegistrySettings(probes_enabled=False))
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                registered = await registry_pb2_grpc.RegistryStub(channel).Register(request, timeout=10)
        finally:
            await plane.stop()

        strict = RegistrySettings(address_policy=AddressPolicy(allow=("10.0.0.0/8",)))
        plane, address = await _plane(tmp_path, strict)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = registry_pb2_grpc.RegistryStub(channel)

                async def health_state() -> int:
                    response = await stub.Resolve(
                        registry_pb2.ResolveRequest(service="probed", include_unhealthy=True)
                    )
                    assert [item.instance_id for item in response.instances] == [registered.instance_id]
                    return response.instances[0].health

                await eventually(lambda: _is(health_state(), registry_pb2.HEALTH_STATE_CRITICAL))
                passing = await stub.Resolve(registry_pb2.ResolveRequest(service="probed"))
                assert list(passing.instances) == []
                # A few more intervals: still critical, and never a connection.
                await asyncio.sleep(0.6)
                assert await health_state() == registry_pb2.HEALTH_STATE_CRITICAL
        finally:
            await plane.stop()
        assert health_servicer.checks == 0
        # The health server answers: the zero above is the prober's restraint, not a dead server.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health_servicer.checks == 1
    finally:
        await server.stop(None)


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_rpcmesh_up_flags_set_the_allow_list_and_link_local(tmp_path: Path) -> None:
    from tests.support.processes import start_control_plane

    proc, address = start_control_plane(
        tmp_path / "data",
        "--allow-address",
        "127.0.0.0/8",
        "--allow-address",
        "169.254.0.0/16",
        "--allow-link-local-addresses",
    )
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            registry = registry_pb2_grpc.RegistryStub(channel)

            async def register(where: str) -> grpc.StatusCode:
                request = registry_pb2.RegisterRequest(
                    instance=registry_pb2.Instance(service="flags", address=where), ttl=ttl(30)
                )
                try:
                    await registry.Register(request, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            assert await register("127.0.0.1:5000") == grpc.StatusCode.OK
            assert await register("169.254.1.1:5000") == grpc.StatusCode.OK  # link-local, allowed by flag
            assert await register("10.1.2.3:5000") == grpc.StatusCode.PERMISSION_DENIED  # not in the list
            assert await register("169.254.169.254:80") == grpc.StatusCode.PERMISSION_DENIED  # metadata
    finally:
        proc.kill()
