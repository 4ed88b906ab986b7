import pytest
from google.protobuf import timestamp_pb2
from rpcmesh.v1 import registry_pb2

from rpcmesh.controlplane.registry import transitions
from rpcmesh.controlplane.registry.model import DELETE, HEALTH, PUT, StoredInstance
from rpcmesh.errors import NotFoundError, PermissionDeniedError

CRITICAL = registry_pb2.HEALTH_STATE_CRITICAL
PASSING = registry_pb2.HEALTH_STATE_PASSING


def declared(**fields: object) -> registry_pb2.Instance:
    values: dict[str, object] = {"service": "echo", "instance_id": "i1", "address": "h:1"}
    values.update(fields)
    return registry_pb2.Instance(**values)  # type: ignore[arg-type]


FRESH = transitions.Fresh(lease_id="L1", lease_token="secret", now=timestamp_pb2.Timestamp(seconds=5))


def create(revision: int = 1, **fields: object) -> StoredInstance:
    change = transitions.register(
        None, revision, declared=declared(**fields), ttl_ms=10_000, lease_token="", fresh=FRESH
    )
    assert change.stored is not None
    return change.stored


def test_create_fills_output_fields_and_hashes_the_token() -> None:
    change = transitions.register(None, 7, declared=declared(), ttl_ms=10_000, lease_token="", fresh=FRESH)
    assert change.event is not None and change.event.type == PUT and change.event.revision == 7
    assert change.stored is not None and change.renew
    inst = change.stored.instance
    assert (inst.lease_id, inst.create_revision, inst.mod_revision, inst.health) == ("L1", 7, 7, PASSING)
    assert inst.ttl.seconds == 10 and inst.registered_at.seconds == 5
    assert change.stored.token_hash != "secret"
    assert change.result == transitions.Registered("i1", "L1", "secret", 10_000)


def test_update_needs_token_and_keeps_identity() -> None:
    current = create()
    for token in ("", "wrong"):
        with pytest.raises(PermissionDeniedError, match="lease_token"):
            transitions.register(
                current, 2, declared=declared(version="2"), ttl_ms=10_000, lease_token=token, fresh=FRESH
            )
    other = transitions.Fresh(lease_id="L2", lease_token="other", now=timestamp_pb2.Timestamp(seconds=9))
    change = transitions.register(
        current, 2, declared=declared(version="2"), ttl_ms=20_000, lease_token="secret", fresh=other
    )
    assert change.stored is not None and change.event is not None
    inst = change.stored.instance
    assert (inst.lease_id, inst.create_revision, inst.mod_revision, inst.version) == ("L1", 1, 2, "2")
    assert inst.registered_at.seconds == 5 and change.stored.ttl_ms == 20_000
    assert change.result.lease_token == "secret"


def test_identical_update_is_a_noop_that_renews() -> None:
    current = create()
    change = transitions.register(
        current, 2, declared=declared(), ttl_ms=10_000, lease_token="secret", fresh=FRESH
    )
    assert change.event is None and change.renew and change.stored is current


def test_deregister_rules() -> None:
    with pytest.raises(NotFoundError):
        transitions.deregister(None, 2, service="echo", instance_id="i1", lease_token="secret")
    current = create()
    with pytest.raises(PermissionDeniedError):
        transitions.deregister(current, 2, service="echo", instance_id="i1", lease_token="bad")
    change = transitions.deregister(current, 2, service="echo", instance_id="i1", lease_token="secret")
    assert change.stored is None and change.event is not None
    assert (change.event.type, change.event.reason) == (DELETE, "deregistered")


def test_expire_only_the_matching_lease() -> None:
    current = create()
    assert transitions.expire(None, 2, lease_id="L1").event is None
    assert transitions.expire(current, 2, lease_id="other").event is None
    change = transitions.expire(current, 2, lease_id="L1")
    assert change.event is not None and change.event.reason == "expired" and change.stored is None


def test_health_combines_report_and_probe() -> None:
    current = create()
    change = transitions.report_health(
        current,
        2,
        service="echo",
        instance_id="i1",
        lease_token="secret",
        status=registry_pb2.SERVING_STATUS_NOT_SERVING,
    )
    assert change.result == CRITICAL and change.event is not None and change.event.type == HEALTH
    assert change.stored is not None
    same = transitions.report_health(
        change.stored,
        3,
        service="echo",
        instance_id="i1",
        lease_token="secret",
        status=registry_pb2.SERVING_STATUS_NOT_SERVING,
    )
    assert same.event is None
    probed = transitions.probe_verdict(current, 3, lease_id="L1", passing=False)
    assert probed.event is not None and probed.event.instance.health == CRITICAL
    assert probed.stored is not None and not probed.stored.probe_passing
    assert transitions.probe_verdict(current, 3, lease_id="gone", passing=False).event is None
    assert transitions.health_verdict(registry_pb2.SERVING_STATUS_SERVING, True) == PASSING
    assert transitions.health_verdict(registry_pb2.SERVING_STATUS_SERVING, False) == CRITICAL
