"""State transitions of one instance: pure decisions the store runs inside its write transaction.

Each function takes the instance as currently stored (or None) and the
revision the change would get, and returns a :class:`Change`, or raises the
StatusError the RPC answers with. They do no I/O, so the SQLite writer thread
and the PostgreSQL transaction run exactly the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import duration_pb2, timestamp_pb2

from rpcmesh.controlplane.registry.model import (
    DELETE,
    HEALTH,
    PUT,
    REASON_DEREGISTERED,
    REASON_EXPIRED,
    Change,
    Event,
    StoredInstance,
    hash_token,
    token_matches,
)
from rpcmesh.errors import NotFoundError, PermissionDeniedError
from rpcmesh.v1 import registry_pb2

PASSING = registry_pb2.HEALTH_STATE_PASSING
CRITICAL = registry_pb2.HEALTH_STATE_CRITICAL


def health_verdict(reported: int, probe_passing: bool) -> registry_pb2.HealthState.ValueType:
    """CRITICAL when the instance reports NOT_SERVING or its probes failed; PASSING otherwise."""
    if reported == registry_pb2.SERVING_STATUS_NOT_SERVING or not probe_passing:
        return CRITICAL
    return PASSING


def ttl_duration(ttl_ms: int) -> duration_pb2.Duration:
    """A Duration of ttl_ms milliseconds."""
    return duration_pb2.Duration(seconds=ttl_ms // 1000, nanos=(ttl_ms % 1000) * 1_000_000)


@dataclass(frozen=True)
class Registered:
    """What Register answers."""

    instance_id: str
    lease_id: str
    lease_token: str
    ttl_ms: int


@dataclass(frozen=True)
class Fresh:
    """Identifiers and time a new registration gets (drawn outside, so the decision stays pure)."""

    lease_id: str
    lease_token: str
    now: timestamp_pb2.Timestamp


def _declared_equal(a: registry_pb2.Instance, b: registry_pb2.Instance) -> bool:
    return (
        a.address == b.address
        and a.version == b.version
        and a.zone == b.zone
        and list(a.tags) == list(b.tags)
        and dict(a.metadata) == dict(b.metadata)
        and a.HasField("health_check") == b.HasField("health_check")
        and a.health_check == b.health_check
    )


def register(
    current: StoredInstance | None,
    revision: int,
    *,
    declared: registry_pb2.Instance,
    ttl_ms: int,
    lease_token: str,
    fresh: Fresh,
) -> Change[Registered]:
    """Create the instance, or update it when it exists and the token matches.

    An update keeps the lease, the token, the creation revision and the health;
    an update that changes nothing uses no revision but still renews the lease.
    """
    if current is None:
        instance = registry_pb2.Instance()
        instance.CopyFrom(declared)
        instance.lease_id = fresh.lease_id
        instance.ttl.CopyFrom(ttl_duration(ttl_ms))
        instance.registered_at.CopyFrom(fresh.now)
        instance.create_revision = revision
        instance.mod_revision = revision
        instance.reported_status = registry_pb2.SERVING_STATUS_UNSPECIFIED
        instance.health = PASSING
        stored = StoredInstance(instance=instance, token_hash=hash_token(fresh.lease_token), ttl_ms=ttl_ms)
        result = Registered(instance.instance_id, fresh.lease_id, fresh.lease_token, ttl_ms)
        return Change(stored, Event(revision, PUT, instance), result, renew=True)
    if not token_matches(current.token_hash, lease_token):
        what = "missing" if not lease_token else "does not match"
        raise PermissionDeniedError(
            f"lease_token: {what} for instance {current.instance.instance_id!r} "
            f"of service {current.instance.service!r}"
        )
    result = Registered(current.instance.instance_id, current.lease_id, lease_token, ttl_ms)
    if _declared_equal(current.instance, declared) and current.ttl_ms == ttl_ms:
        return Change(current, None, result, renew=True)
    instance = registry_pb2.Instance()
    instance.CopyFrom(declared)
    instance.lease_id = current.lease_id
    instance.owner = current.instance.owner
    instance.registered_at.CopyFrom(current.instance.registered_at)
    instance.create_revision = current.instance.create_revision
    instance.reported_status = current.instance.reported_status
    instance.ttl.CopyFrom(ttl_duration(ttl_ms))
    instance.mod_revision = revision
    probe_passing = current.probe_passing if declared.HasField("health_check") else True
    instance.health = health_verdict(instance.reported_status, probe_passing)
    stored = StoredInstance(
        instance=instance, token_hash=current.token_hash, ttl_ms=ttl_ms, probe_passing=probe_passing
    )
    return Change(stored, Event(revision, PUT, instance), result, renew=True)


def _require(current: StoredInstance | None, service: str, instance_id: str) -> StoredInstance:
    if current is None:
        raise NotFoundError(f"instance {instance_id!r} of service {service!r} is not registered (or expired)")
    return current


def _require_token(current: StoredInstance, lease_token: str) -> None:
    if not token_matches(current.token_hash, lease_token):
        what = "missing" if not lease_token else "does not match"
        raise PermissionDeniedError(f"lease_token: {what} for instance {current.instance.instance_id!r}")


def deregister(
    current: StoredInstance | None, revision: int, *, service: str, instance_id: str, lease_token: str
) -> Change[None]:
    """Remove the instance; NOT_FOUND when absent, PERMISSION_DENIED without its token."""
    stored = _require(current, service, instance_id)
    _require_token(stored, lease_token)
    return Change(None, Event(revision, DELETE, stored.instance, REASON_DEREGISTERED), None)


def expire(current: StoredInstance | None, revision: int, *, lease_id: str) -> Change[None]:
    """Remove the instance whose lease ran out; a no-op if it is gone or holds another lease."""
    if current is None or current.lease_id != lease_id:
        return Change(current, None, None)
    return Change(None, Event(revision, DELETE, current.instance, REASON_EXPIRED), None)


def _with_health(
    current: StoredInstance, revision: int, reported: int, probe_passing: bool
) -> Change[registry_pb2.HealthState.ValueType]:
    health = health_verdict(reported, probe_passing)
    if reported == current.instance.reported_status and probe_passing == current.probe_passing:
        return Change(current, None, health)
    instance = registry_pb2.Instance()
    instance.CopyFrom(current.instance)
    instance.reported_status = registry_pb2.ServingStatus.ValueType(reported)
    instance.health = health
    instance.mod_revision = revision
    stored = StoredInstance(
        instance=instance, token_hash=current.token_hash, ttl_ms=current.ttl_ms, probe_passing=probe_passing
    )
    return Change(stored, Event(revision, HEALTH, instance), health)


def report_health(
    current: StoredInstance | None,
    revision: int,
    *,
    service: str,
    instance_id: str,
    lease_token: str,
    status: int,
) -> Change[registry_pb2.HealthState.ValueType]:
    """Record what the instance says about itself; a HEALTH event when that changes anything."""
    stored = _require(current, service, instance_id)
    _require_token(stored, lease_token)
    return _with_health(stored, revision, status, stored.probe_passing)


def probe_verdict(
    current: StoredInstance | None, revision: int, *, lease_id: str, passing: bool
) -> Change[registry_pb2.HealthState.ValueType | None]:
    """Record the damped verdict of the active probes; a no-op when the instance is gone."""
    if current is None or current.lease_id != lease_id:
        return Change(current, None, None)
    change = _with_health(current, revision, current.instance.reported_status, passing)
    return Change(change.stored, change.event, change.result)
