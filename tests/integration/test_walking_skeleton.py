"""Issue 2's end-to-end path: `rpcmesh up` and an example service as real processes.

The control plane serves health and reflection; a service registers itself and
a client finds it by name; a lease that is not renewed expires; the Registry's
data survives a restart of the control plane.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from tests.support.processes import ManagedProcess, start_control_plane


def list_services_by_reflection(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return {service.name for service in response.list_services_response.service}


def test_control_plane_serves_health_and_reflection(control_plane: tuple[ManagedProcess, str]) -> None:
    _, address = control_plane
    services = list_services_by_reflection(address)
    assert {
        "rpcmesh.v1.Registry",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "rpcmesh.v1.Registry"):
            response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def register(address: str, service: str, instance_id: str, ttl_seconds: int) -> registry_pb2.RegisterResponse:
    with grpc.insecure_channel(address) as channel:
        return registry_pb2_grpc.RegistryStub(channel).Register(
            registry_pb2.RegisterRequest(
                instance=registry_pb2.Instance(
                    service=service, instance_id=instance_id, address="127.0.0.1:9"
                ),
                ttl=duration_pb2.Duration(seconds=ttl_seconds),
            ),
            timeout=10,
        )


def resolve(address: str, service: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        response = registry_pb2_grpc.RegistryStub(channel).Resolve(
            registry_pb2.ResolveRequest(service=service, include_unhealthy=True), timeout=10
        )
    return [instance.instance_id for instance in response.instances]


def test_an_instance_whose_lease_is_not_renewed_disappears_after_its_ttl(
    control_plane: tuple[ManagedProcess, str],
) -> None:
    _, address = control_plane
    register(address, "short-lived", "a", ttl_seconds=1)
    register(address, "long-lived", "b", ttl_seconds=60)
    assert resolve(address, "short-lived") == ["a"]
    deadline = time.monotonic() + 10
    while resolve(address, "short-lived") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert resolve(address, "short-lived") == []
    assert resolve(address, "long-lived") == ["b"]


def test_registrations_survive_a_restart_of_the_control_plane(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first, address = start_control_plane(data_dir)
    try:
        register(address, "orders", "orders-1", ttl_seconds=60)
        assert first.terminate() == 0
    finally:
        first.kill()
    second, address = start_control_plane(data_dir)
    try:
        assert resolve(address, "orders") == ["orders-1"]
    finally:
        second.kill()
