"""The Registry's behaviour over gRPC against a real `rpcmesh up` process, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from rpcmesh.errors import from_rpc_error
from tests.integration.registry.helpers import eventually, instance, register, resolve_ids, ttl

PUT = registry_pb2.WATCH_EVENT_TYPE_PUT
DELETE = registry_pb2.WATCH_EVENT_TYPE_DELETE
HEALTH = registry_pb2.WATCH_EVENT_TYPE_HEALTH


async def test_register_then_resolve_with_filters(registry: registry_pb2_grpc.RegistryStub) -> None:
    a = await register(
        registry, port=5001, zone="eu", version="1.0", tags=["grpc", "blue"], metadata={"k": "v"}
    )
    b = await register(registry, port=5002, zone="us", version="2.0", tags=["grpc"])
    assert a.instance_id and a.lease_id and a.lease_token and a.revision > 0
    assert b.revision > a.revision
    assert await resolve_ids(registry, "echo") == {a.instance_id, b.instance_id}
    assert await resolve_ids(registry, "echo", zone="eu") == {a.instance_id}
    assert await resolve_ids(registry, "echo", version="2.0") == {b.instance_id}
    assert await resolve_ids(registry, "echo", tags=["grpc", "blue"]) == {a.instance_id}
    assert await resolve_ids(registry, "echo", metadata={"k": "v"}) == {a.instance_id}
    assert await resolve_ids(registry, "echo", metadata={"k": "other"}) == set()
    assert await resolve_ids(registry, "unknown") == set()


async def test_register_again_updates_with_token_and_needs_it(
    registry: registry_pb2_grpc.RegistryStub,
) -> None:
    first = await register(registry, version="1")
    update = registry_pb2.RegisterRequest(
        instance=instance(instance_id=first.instance_id, version="2"),
        ttl=ttl(30),
        lease_token=first.lease_token,
    )
    second = await registry.Register(update)
    assert (second.instance_id, second.lease_id) == (first.instance_id, first.lease_id)
    again = await registry.Register(update)
    assert again.revision == second.revision, "an identical update changes nothing"
    found = (await registry.Resolve(registry_pb2.ResolveRequest(service="echo"))).instances
    assert [(item.version, item.create_revision, item.mod_revision) for item in found] == [
        ("2", first.revision, second.revision)
    ]
    for token in ("", "wrong"):
        request = registry_pb2.RegisterRequest(
            instance=instance(instance_id=first.instance_id, version="3"), lease_token=token
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await registry.Register(request)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "lease_token" in (caught.value.details() or "")
    found = (await registry.Resolve(registry_pb2.ResolveRequest(service="echo"))).instances
    assert [item.version for item in found] == ["2"]


async def test_deregister_needs_token_and_then_removes(registry: registry_pb2_grpc.RegistryStub) -> None:
    reg = await register(registry)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.Deregister(
            registry_pb2.DeregisterRequest(service="echo", instance_id=reg.instance_id, lease_token="nope")
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await resolve_ids(registry, "echo") == {reg.instance_id}
    done = await registry.Deregister(
        registry_pb2.DeregisterRequest(
            service="echo", instance_id=reg.instance_id, lease_token=reg.lease_token
        )
    )
    assert done.revision > reg.revision
    assert await resolve_ids(registry, "echo") == set()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.Deregister(
            registry_pb2.DeregisterRequest(
                service="echo", instance_id=reg.instance_id, lease_token=reg.lease_token
            )
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.Heartbeat(
            registry_pb2.HeartbeatRequest(lease_id=reg.lease_id, lease_token=reg.lease_token)
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unrenewed_lease_expires_and_watchers_get_delete(
    registry: registry_pb2_grpc.RegistryStub,
) -> None:
    watch = registry.Watch(registry_pb2.WatchRequest(service="echo"))
    snapshot = await watch.read()
    assert snapshot.snapshot and list(snapshot.events) == []
    kept = await register(registry, port=5001, ttl_seconds=1)
    dropped = await register(registry, port=5002, ttl_seconds=1)

    async def renew_kept() -> None:
        while True:
            await registry.Heartbeat(
                registry_pb2.HeartbeatRequest(lease_id=kept.lease_id, lease_token=kept.lease_token)
            )
            await asyncio.sleep(0.2)

    renewer = asyncio.create_task(renew_kept())
    try:
        took = await eventually(lambda: _absent(registry, dropped.instance_id), limit=10)
        assert took < 8
        assert await resolve_ids(registry, "echo") == {kept.instance_id}
        events = []
        while len(events) < 3:
            response = await asyncio.wait_for(watch.read(), 10)
            events.extend(response.events)
        assert [(e.type, e.instance.instance_id) for e in events] == [
            (PUT, kept.instance_id),
            (PUT, dropped.instance_id),
            (DELETE, dropped.instance_id),
        ]
        assert events[2].reason == "expired"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await registry.Heartbeat(
                registry_pb2.HeartbeatRequest(lease_id=dropped.lease_id, lease_token=dropped.lease_token)
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        renewer.cancel()
        watch.cancel()


async def _absent(registry: registry_pb2_grpc.RegistryStub, instance_id: str) -> bool:
    return instance_id not in await resolve_ids(registry, "echo")


async def test_keepalive_renews_many_leases_and_reports_each(
    registry: registry_pb2_grpc.RegistryStub,
) -> None:
    # A 2 s TTL renewed every ~0.3 s keeps a wide margin on a loaded machine.
    leases = [await register(registry, port=5000 + i, ttl_seconds=2) for i in range(3)]
    stream = registry.KeepAlive()
    try:
        for _ in range(10):  # 3 s and more: well past the 2 s TTL
            for lease in leases:
                await stream.write(
                    registry_pb2.KeepAliveRequest(lease_id=lease.lease_id, lease_token=lease.lease_token)
                )
                answer = await stream.read()
                assert (answer.lease_id, answer.code, answer.ttl.seconds) == (lease.lease_id, 0, 2)
            await asyncio.sleep(0.3)
        assert await resolve_ids(registry, "echo") == {lease.instance_id for lease in leases}
        await stream.write(registry_pb2.KeepAliveRequest(lease_id="nope", lease_token="x"))
        unknown = await stream.read()
        assert unknown.code == grpc.StatusCode.NOT_FOUND.value[0] and unknown.ttl.seconds == 0
        await stream.write(registry_pb2.KeepAliveRequest(lease_id=leases[0].lease_id, lease_token="wrong"))
        denied = await stream.read()
        assert denied.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        await stream.write(
            registry_pb2.KeepAliveRequest(lease_id=leases[0].lease_id, lease_token=leases[0].lease_token)
        )
        assert (await stream.read()).code == 0, "a failed renewal does not end the stream"
    finally:
        stream.cancel()


async def test_report_health_hides_instance_and_emits_health(
    registry: registry_pb2_grpc.RegistryStub,
) -> None:
    reg = await register(registry)
    watch = registry.Watch(registry_pb2.WatchRequest(service="echo", after_revision=reg.revision))
    try:
        answer = await registry.ReportHealth(
            registry_pb2.ReportHealthRequest(
                service="echo",
                instance_id=reg.instance_id,
                lease_token=reg.lease_token,
                status=registry_pb2.SERVING_STATUS_NOT_SERVING,
            )
        )
        assert answer.health == registry_pb2.HEALTH_STATE_CRITICAL
        assert await resolve_ids(registry, "echo") == set()
        assert await resolve_ids(registry, "echo", include_unhealthy=True) == {reg.instance_id}
        summary = (await registry.ListServices(registry_pb2.ListServicesRequest())).services
        assert [(s.name, s.instance_count, s.passing_count) for s in summary] == [("echo", 1, 0)]
        response = await asyncio.wait_for(watch.read(), 10)
        assert [(e.type, e.revision, e.instance.health) for e in response.events] == [
            (HEALTH, answer.revision, registry_pb2.HEALTH_STATE_CRITICAL)
        ]
    finally:
        watch.cancel()


async def test_watch_orders_events_and_resumes_without_gaps(registry: registry_pb2_grpc.RegistryStub) -> None:
    existing = await register(registry, service="alpha")
    watch = registry.Watch(registry_pb2.WatchRequest())
    first = await watch.read()
    assert first.snapshot and [e.instance.instance_id for e in first.events] == [existing.instance_id]
    assert all(e.revision == first.revision for e in first.events)
    registered = await asyncio.gather(*(register(registry, service="beta", port=6000 + i) for i in range(20)))
    seen: list[registry_pb2.WatchEvent] = []
    while len(seen) < 20:
        seen.extend((await asyncio.wait_for(watch.read(), 10)).events)
    watch.cancel()
    revisions = [e.revision for e in seen]
    assert revisions == sorted(revisions) and len(set(revisions)) == 20
    assert revisions == list(range(first.revision + 1, first.revision + 21))
    assert {e.instance.instance_id for e in seen} == {r.instance_id for r in registered}

    # Disconnected at the 10th event: resume gets exactly the rest, then live events.
    resume_from = revisions[9]
    resumed = registry.Watch(registry_pb2.WatchRequest(after_revision=resume_from))
    later = await registry.Deregister(
        registry_pb2.DeregisterRequest(
            service="alpha", instance_id=existing.instance_id, lease_token=existing.lease_token
        )
    )
    got: list[registry_pb2.WatchEvent] = []
    while len(got) < 11:
        response = await asyncio.wait_for(resumed.read(), 10)
        assert not response.snapshot
        got.extend(response.events)
    resumed.cancel()
    assert [e.revision for e in got] == [*revisions[10:], later.revision]
    assert (got[-1].type, got[-1].reason) == (DELETE, "deregistered")

    # A service filter sees only its own events, still in order.
    only_alpha = registry.Watch(registry_pb2.WatchRequest(service="alpha", after_revision=first.revision))
    response = await asyncio.wait_for(only_alpha.read(), 10)
    only_alpha.cancel()
    assert [(e.type, e.revision) for e in response.events] == [(DELETE, later.revision)]


async def test_watch_from_a_revision_never_reached_is_out_of_range(
    registry: registry_pb2_grpc.RegistryStub,
) -> None:
    reg = await register(registry, service="future")
    # The registry never reached this revision (it lost its data, or is another registry).
    ahead = registry.Watch(registry_pb2.WatchRequest(service="future", after_revision=reg.revision + 50))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(ahead.read(), 10)
    assert caught.value.code() is grpc.StatusCode.OUT_OF_RANGE
    # Its own revision is fine: a resume that starts where the registry is.
    current = registry.Watch(registry_pb2.WatchRequest(service="future", after_revision=reg.revision))
    later = await register(registry, service="future", port=5001)
    response = await asyncio.wait_for(current.read(), 10)
    current.cancel()
    assert [e.instance.instance_id for e in response.events] == [later.instance_id]


async def test_list_services_paginates(registry: registry_pb2_grpc.RegistryStub) -> None:
    names = [f"svc-{i:02d}" for i in range(7)]
    for index, name in enumerate(names):
        for port in range(index % 3 + 1):
            await register(registry, service=name, port=7000 + port)
    seen: list[tuple[str, int]] = []
    token = ""
    pages = 0
    while True:
        page = await registry.ListServices(registry_pb2.ListServicesRequest(page_size=3, page_token=token))
        pages += 1
        seen.extend((s.name, s.instance_count) for s in page.services)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == [(name, index % 3 + 1) for index, name in enumerate(names)]


BAD_REGISTRATIONS = [
    (instance(service="Bad_Name"), "instance.service"),
    (instance(service="x" * 64), "instance.service"),
    (instance(service=""), "instance.service"),
    (registry_pb2.Instance(service="echo", address="127.0.0.1:0"), "instance.address"),
    (registry_pb2.Instance(service="echo", address="127.0.0.1:65536"), "instance.address"),
    (registry_pb2.Instance(service="echo", address="no-port"), "instance.address"),
    (instance(tags=[f"t{i}" for i in range(33)]), "instance.tags"),
    (instance(metadata={f"k{i}": "v" for i in range(65)}), "instance.metadata"),
    (instance(metadata={"big": "x" * 9000}), "instance.metadata"),
]


@pytest.mark.parametrize(("bad", "field"), BAD_REGISTRATIONS)
async def test_bad_registration_is_invalid_argument_and_changes_nothing(
    registry: registry_pb2_grpc.RegistryStub, bad: registry_pb2.Instance, field: str
) -> None:
    before = await registry.ListServices(registry_pb2.ListServicesRequest())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.Register(registry_pb2.RegisterRequest(instance=bad, ttl=ttl(10)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(field)
    mapped = from_rpc_error(caught.value)
    assert mapped.details, "carries a google.rpc.BadRequest naming the field"
    after = await registry.ListServices(registry_pb2.ListServicesRequest())
    assert after.revision == before.revision and list(after.services) == list(before.services)


@pytest.mark.parametrize("seconds", [0.5, 3601])
async def test_ttl_out_of_bounds_is_invalid_argument(
    registry: registry_pb2_grpc.RegistryStub, seconds: float
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.Register(registry_pb2.RegisterRequest(instance=instance(), ttl=ttl(seconds)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("ttl")


async def test_other_bad_requests(registry: registry_pb2_grpc.RegistryStub) -> None:
    cases = [
        (registry.Resolve(registry_pb2.ResolveRequest(service="NOPE")), "service"),
        (registry.ListServices(registry_pb2.ListServicesRequest(page_size=1001)), "page_size"),
        (registry.ListServices(registry_pb2.ListServicesRequest(page_token="garbage!")), "page_token"),
        (registry.Heartbeat(registry_pb2.HeartbeatRequest()), "lease_id"),
    ]
    for call, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert (caught.value.details() or "").startswith(field)
    watch = registry.Watch(registry_pb2.WatchRequest(after_revision=-1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_active_probe_with_flap_damping(registry: registry_pb2_grpc.RegistryStub) -> None:
    from google.protobuf import duration_pb2
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("echo", health_pb2.HealthCheckResponse.SERVING)
    check = registry_pb2.GrpcHealthCheck(
        service_name="echo",
        interval=duration_pb2.Duration(nanos=200_000_000),
        timeout=duration_pb2.Duration(nanos=150_000_000),
        failures_before_critical=2,
        successes_before_passing=2,
    )
    watch = None
    try:
        reg = await register(registry, port=port, health_check=check)
        watch = registry.Watch(registry_pb2.WatchRequest(service="echo", after_revision=reg.revision))
        assert await resolve_ids(registry, "echo") == {reg.instance_id}
        await servicer.set("echo", health_pb2.HealthCheckResponse.NOT_SERVING)
        await eventually(lambda: _absent(registry, reg.instance_id))
        assert await resolve_ids(registry, "echo", include_unhealthy=True) == {reg.instance_id}
        await servicer.set("echo", health_pb2.HealthCheckResponse.SERVING)
        await eventually(lambda: _present(registry, reg.instance_id))
        events: list[registry_pb2.WatchEvent] = []
        while len(events) < 2:
            events.extend((await asyncio.wait_for(watch.read(), 10)).events)
        assert [(e.type, e.instance.health) for e in events] == [
            (HEALTH, registry_pb2.HEALTH_STATE_CRITICAL),
            (HEALTH, registry_pb2.HEALTH_STATE_PASSING),
        ]
        await server.stop(0)  # probes now fail to connect: critical again
        await eventually(lambda: _absent(registry, reg.instance_id))
    finally:
        if watch is not None:
            watch.cancel()
        await server.stop(0)


async def _present(registry: registry_pb2_grpc.RegistryStub, instance_id: str) -> bool:
    return instance_id in await resolve_ids(registry, "echo")
