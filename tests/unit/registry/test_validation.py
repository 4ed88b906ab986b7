import pytest
from google.protobuf import duration_pb2
from rpcmesh.v1 import registry_pb2

from rpcmesh.controlplane.registry import validation
from rpcmesh.errors import InvalidArgumentError


def request(ttl_ms: int | None = 10_000, **fields: object) -> registry_pb2.RegisterRequest:
    values: dict[str, object] = {"service": "echo", "address": "127.0.0.1:5000"}
    values.update(fields)
    req = registry_pb2.RegisterRequest(instance=registry_pb2.Instance(**values))  # type: ignore[arg-type]
    if ttl_ms is not None:
        req.ttl.CopyFrom(duration_pb2.Duration(seconds=ttl_ms // 1000, nanos=(ttl_ms % 1000) * 1_000_000))
    return req


@pytest.mark.parametrize("name", ["a", "echo", "my-service-2", "x" * 63, "0abc"])
def test_dns_labels_accepted(name: str) -> None:
    assert validation.service_name(name) == name


@pytest.mark.parametrize("name", ["", "Echo", "-a", "a-", "a_b", "a.b", "x" * 64, "é"])
def test_bad_service_names_name_the_field(name: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        validation.service_name(name, "instance.service")
    assert caught.value.message.startswith("instance.service:")


@pytest.mark.parametrize("address", ["127.0.0.1:1", "localhost:65535", "[::1]:50051", "svc.ns.local:80"])
def test_addresses_accepted(address: str) -> None:
    assert validation.address(address) == address


@pytest.mark.parametrize(
    "address", ["", "host", ":80", "host:0", "host:65536", "host:x", "::1:80", "[::1:80", "[zz]:80", "a b:80"]
)
def test_bad_addresses(address: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        validation.address(address)
    assert caught.value.message.startswith("instance.address:")


def test_ttl_bounds_and_default() -> None:
    assert validation.register_request(request(ttl_ms=None)).ttl_ms == validation.DEFAULT_TTL_MS
    assert validation.register_request(request(ttl_ms=1000)).ttl_ms == 1000
    assert validation.register_request(request(ttl_ms=3_600_000)).ttl_ms == 3_600_000
    for bad in (999, 3_600_001, 0):
        with pytest.raises(InvalidArgumentError, match=r"^INVALID_ARGUMENT: ttl:"):
            validation.register_request(request(ttl_ms=bad))


def test_tag_and_metadata_limits() -> None:
    validation.register_request(request(tags=[f"t{i}" for i in range(32)]))
    with pytest.raises(InvalidArgumentError, match=r"^INVALID_ARGUMENT: instance.tags:"):
        validation.register_request(request(tags=[f"t{i}" for i in range(33)]))
    with pytest.raises(InvalidArgumentError, match=r"^INVALID_ARGUMENT: instance.tags\[1\]:"):
        validation.register_request(request(tags=["a", ""]))
    validation.register_request(request(metadata={f"k{i}": "v" for i in range(64)}))
    with pytest.raises(InvalidArgumentError, match=r"^INVALID_ARGUMENT: instance.metadata:"):
        validation.register_request(request(metadata={f"k{i}": "v" for i in range(65)}))
    validation.register_request(request(metadata={"k": "x" * (8192 - 1)}))
    with pytest.raises(InvalidArgumentError, match=r"^INVALID_ARGUMENT: instance.metadata:"):
        validation.register_request(request(metadata={"k": "x" * 8192}))


def test_health_check_bounds() -> None:
    check = registry_pb2.GrpcHealthCheck(interval=duration_pb2.Duration(nanos=50_000_000))
    with pytest.raises(InvalidArgumentError, match=r"^INVALID_ARGUMENT: instance.health_check.interval:"):
        validation.register_request(request(health_check=check))
    check = registry_pb2.GrpcHealthCheck(
        interval=duration_pb2.Duration(seconds=1), timeout=duration_pb2.Duration(seconds=2)
    )
    with pytest.raises(InvalidArgumentError, match=r"^INVALID_ARGUMENT: instance.health_check.timeout:"):
        validation.register_request(request(health_check=check))
    short = registry_pb2.GrpcHealthCheck(interval=duration_pb2.Duration(nanos=500_000_000))
    assert validation.probe_timeout_ms(short) == 500


def test_output_only_fields_are_dropped() -> None:
    spec = validation.register_request(
        request(lease_id="forged", create_revision=99, health=registry_pb2.HEALTH_STATE_CRITICAL)
    )
    assert spec.instance.lease_id == "" and spec.instance.create_revision == 0
    assert spec.instance.health == registry_pb2.HEALTH_STATE_UNSPECIFIED


def test_missing_instance() -> None:
    with pytest.raises(InvalidArgumentError, match=r"^INVALID_ARGUMENT: instance:"):
        validation.register_request(registry_pb2.RegisterRequest())
