"""Undecodable requests and unknown enum numbers get INVALID_ARGUMENT, change nothing, and log little.

Raw bytes are sent to every method of every rpcmesh.v1 service of a real `rpcmesh up`, once with
authentication off and once as an admin over TLS with a token (the admin's calls reach the handlers):
a truncated message, and invalid UTF-8 in a string field, must answer INVALID_ARGUMENT (never
grpc-aio's UNKNOWN), and the control plane logs at most one line per client a minute for them,
with no traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from rpcmesh.v1 import bus_pb2, eventstore_pb2, registry_pb2, registry_pb2_grpc, saga_pb2

from rpcmesh.security.client import ClientSecurity, sync_channel
from rpcmesh.security.tls import ClientTlsConfig
from tests.integration.security.conftest import Pki, _start
from tests.support.processes import ManagedProcess, start_control_plane

METHODS = [
    (service, method)
    for module in (registry_pb2, bus_pb2, saga_pb2, eventstore_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
METHOD_IDS = [f"{service.name}.{method.name}" for service, method in METHODS]
TRUNCATED = b"\x0a\x05ab"  # field 1, length 5, but only two bytes follow
REFUSED_LINE = re.compile(r"refused a bad request")


def _call_raw(channel: grpc.Channel, service: Any, method: Any, body: bytes) -> tuple[grpc.StatusCode, str]:
    path = f"/{service.full_name}/{method.name}"
    try:
        if not method.client_streaming and not method.server_streaming:
            channel.unary_unary(path)(body, timeout=5.0)
        elif not method.client_streaming:
            for _ in channel.unary_stream(path)(body, timeout=5.0):
                pass
        elif not method.server_streaming:
            channel.stream_unary(path)(iter([body]), timeout=5.0)
        else:
            for _ in channel.stream_stream(path)(iter([body]), timeout=5.0):
                pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module", params=["open", "admin"])
def plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[tuple[ManagedProcess, grpc.Channel]]:
    folder: Path = tmp_path_factory.mktemp("bad-input")
    if request.param == "open":
        proc, address = start_control_plane(folder / "data")
        channel = grpc.insecure_channel(address)
    else:
        proc, address = _start(folder, pki)
        channel = sync_channel(
            address, ClientSecurity(tls=ClientTlsConfig(ca_file=pki.ca), token=pki.token("ops"))
        )
    try:
        yield proc, channel
    finally:
        channel.close()
        proc.kill()


@pytest.mark.parametrize(("service", "method"), METHODS, ids=METHOD_IDS)
def test_a_truncated_request_is_invalid_argument(
    plane: tuple[ManagedProcess, grpc.Channel], service: Any, method: Any
) -> None:
    code, details = _call_raw(plane[1], service, method, TRUNCATED)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (method.full_name, code, details)
    assert "cannot be decoded" in details


def test_invalid_utf8_and_unknown_enums_are_refused_and_change_nothing(
    plane: tuple[ManagedProcess, grpc.Channel],
) -> None:
    channel = plane[1]
    registry = registry_pb2_grpc.RegistryStub(channel)
    resolve = next(m for s, m in METHODS if m.full_name == "rpcmesh.v1.Registry.Resolve")
    code, details = _call_raw(channel, resolve.containing_service, resolve, b"\x0a\x02\xff\xfe")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in details, details

    before = registry.ListServices(registry_pb2.ListServicesRequest(), timeout=5)
    instance = registry_pb2.Instance(service="bad-enum", address="127.0.0.1:9", reported_status=99)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as caught:
        registry.Register(
            registry_pb2.RegisterRequest(instance=instance, ttl=duration_pb2.Duration(seconds=30)), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "instance.reported_status" in (caught.value.details() or "")  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as caught:
        registry.ReportHealth(
            registry_pb2.ReportHealthRequest(service="bad-enum", instance_id="i", status=99),  # type: ignore[arg-type]
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "status" in (caught.value.details() or "")  # type: ignore[attr-defined]
    after = registry.ListServices(registry_pb2.ListServicesRequest(), timeout=5)
    assert after.revision == before.revision and list(after.services) == list(before.services)


def test_bad_requests_log_at_most_one_line_per_client_a_minute(
    plane: tuple[ManagedProcess, grpc.Channel],
) -> None:
    proc, channel = plane
    for service, method in METHODS[:10]:
        for _ in range(3):
            _call_raw(channel, service, method, TRUNCATED)
    output = proc.output()
    assert len(REFUSED_LINE.findall(output)) <= 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
