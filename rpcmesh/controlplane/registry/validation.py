"""Validation of Registry requests: pure functions that raise INVALID_ARGUMENT naming the field.

Every check runs before anything is read or written, so a rejected request
changes nothing. Limits follow the contract in ``registry.proto``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from google.protobuf import duration_pb2

from rpcmesh.errors import invalid_argument
from rpcmesh.v1 import registry_pb2

MAX_SERVICE_NAME = 63
MAX_INSTANCE_ID = 128
MAX_TAGS = 32
MAX_TAG = 128
MAX_LABEL = 128
MAX_METADATA_ENTRIES = 64
MAX_METADATA_BYTES = 8 * 1024
MIN_TTL_MS = 1_000
MAX_TTL_MS = 3_600_000
DEFAULT_TTL_MS = 30_000
MIN_PROBE_INTERVAL_MS = 100
MAX_PROBE_INTERVAL_MS = 3_600_000
DEFAULT_PROBE_INTERVAL_MS = 10_000
DEFAULT_PROBE_TIMEOUT_MS = 2_000
DEFAULT_FAILURES_BEFORE_CRITICAL = 2
DEFAULT_SUCCESSES_BEFORE_PASSING = 1
MAX_THRESHOLD = 100
MAX_HOST = 253

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
_HOSTNAME = re.compile(
    r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?$"
)


def service_name(value: str, field: str = "service") -> str:
    """Check a service name: a DNS label (lowercase letters, digits, '-'), 1-63 characters."""
    if not value:
        raise invalid_argument(field, "required")
    if len(value) > MAX_SERVICE_NAME:
        raise invalid_argument(field, f"at most {MAX_SERVICE_NAME} characters, got {len(value)}")
    if not _DNS_LABEL.match(value):
        raise invalid_argument(
            field, f"{value!r} is not a DNS label (lowercase letters, digits and '-', not at either end)"
        )
    return value


def instance_id(value: str, field: str = "instance_id") -> str:
    """Check a caller-chosen instance id: 1-128 of letters, digits, '.', '_', ':' and '-'."""
    if not value:
        raise invalid_argument(field, "required")
    if len(value) > MAX_INSTANCE_ID:
        raise invalid_argument(field, f"at most {MAX_INSTANCE_ID} characters, got {len(value)}")
    if not _INSTANCE_ID.match(value):
        raise invalid_argument(field, f"{value!r} may hold only letters, digits, '.', '_', ':' and '-'")
    return value


def address(value: str, field: str = "instance.address") -> str:
    """Check host:port; IPv6 hosts are bracketed (``[::1]:50051``); port 1-65535."""
    if not value:
        raise invalid_argument(field, "required (host:port)")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise invalid_argument(field, f"{value!r} is not host:port")
    if not port_text.isdigit():
        raise invalid_argument(field, f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise invalid_argument(field, f"port must be 1-65535, got {port}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise invalid_argument(field, f"unbalanced brackets in {value!r}")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise invalid_argument(field, f"{host!r} is not an IPv6 address") from None
        return value
    if ":" in host:
        raise invalid_argument(field, f"IPv6 hosts must be bracketed, as in [::1]:{port}")
    if len(host) > MAX_HOST or not _HOSTNAME.match(host):
        raise invalid_argument(field, f"{host!r} is not a host name or IPv4 address")
    _dotted_quad_only(host, field)
    return value


def _dotted_quad_only(host: str, field: str) -> None:
    """Refuse numeric IPv4 forms other than a dotted quad (``2852039166``, ``0x7f.1``, ``010.0.0.1``).

    Resolvers read them as IPv4 addresses (inet_aton), so they would slip past the address
    policy as host names. A trailing dot is not allowed on a dotted quad either.
    """
    try:
        parsed = socket.inet_aton(host.rstrip("."))
    except OSError:
        return
    canonical = socket.inet_ntoa(parsed)
    if host != canonical:
        raise invalid_argument(
            field, f"{host!r} is a numeric IPv4 form; write it as the dotted quad {canonical}"
        )


def duration_ms(value: duration_pb2.Duration) -> int:
    """A Duration in whole milliseconds."""
    return value.seconds * 1000 + value.nanos // 1_000_000


def ttl_ms(request: registry_pb2.RegisterRequest, field: str = "ttl") -> int:
    """The lease TTL of a RegisterRequest in ms: 1 s to 1 h, 30 s when unset."""
    if not request.HasField("ttl"):
        return DEFAULT_TTL_MS
    value = duration_ms(request.ttl)
    if request.ttl.seconds < 0 or request.ttl.nanos < 0 or not MIN_TTL_MS <= value <= MAX_TTL_MS:
        raise invalid_argument(field, f"must be between 1s and 1h, got {value} ms")
    return value


def _label(value: str, field: str) -> None:
    if len(value) > MAX_LABEL:
        raise invalid_argument(field, f"at most {MAX_LABEL} characters, got {len(value)}")


def tags(values: list[str] | tuple[str, ...], field: str = "instance.tags") -> None:
    """At most 32 non-empty tags of at most 128 characters."""
    if len(values) > MAX_TAGS:
        raise invalid_argument(field, f"at most {MAX_TAGS} tags, got {len(values)}")
    for index, tag in enumerate(values):
        if not tag:
            raise invalid_argument(f"{field}[{index}]", "must not be empty")
        _label(tag, f"{field}[{index}]")


def metadata(values: dict[str, str], field: str = "instance.metadata") -> None:
    """At most 64 entries and 8 KiB of keys and values (UTF-8) in all; keys non-empty."""
    if len(values) > MAX_METADATA_ENTRIES:
        raise invalid_argument(field, f"at most {MAX_METADATA_ENTRIES} entries, got {len(values)}")
    size = 0
    for key, value in values.items():
        if not key:
            raise invalid_argument(field, "keys must not be empty")
        size += len(key.encode()) + len(value.encode())
    if size > MAX_METADATA_BYTES:
        raise invalid_argument(field, f"at most {MAX_METADATA_BYTES} bytes of keys and values, got {size}")


def health_check(check: registry_pb2.GrpcHealthCheck, field: str = "instance.health_check") -> None:
    """Bounds of an active probe: interval >= 100 ms, 0 < timeout <= interval, thresholds 1-100."""
    interval = probe_interval_ms(check)
    timeout = probe_timeout_ms(check)
    if not MIN_PROBE_INTERVAL_MS <= interval <= MAX_PROBE_INTERVAL_MS:
        raise invalid_argument(f"{field}.interval", f"must be between 100ms and 1h, got {interval} ms")
    if not 0 < timeout <= interval:
        raise invalid_argument(f"{field}.timeout", f"must be > 0 and at most the interval, got {timeout} ms")
    if check.failures_before_critical > MAX_THRESHOLD:
        raise invalid_argument(f"{field}.failures_before_critical", f"at most {MAX_THRESHOLD}")
    if check.successes_before_passing > MAX_THRESHOLD:
        raise invalid_argument(f"{field}.successes_before_passing", f"at most {MAX_THRESHOLD}")
    if len(check.service_name) > 200:
        raise invalid_argument(f"{field}.service_name", "at most 200 characters")


def probe_interval_ms(check: registry_pb2.GrpcHealthCheck) -> int:
    """Probe interval with the contract's default."""
    return duration_ms(check.interval) if check.HasField("interval") else DEFAULT_PROBE_INTERVAL_MS


def probe_timeout_ms(check: registry_pb2.GrpcHealthCheck) -> int:
    """Probe timeout with the contract's default (capped by the interval)."""
    if check.HasField("timeout"):
        return duration_ms(check.timeout)
    return min(DEFAULT_PROBE_TIMEOUT_MS, probe_interval_ms(check))


@dataclass(frozen=True)
class RegisterSpec:
    """A validated registration: the instance's declared fields, and its TTL."""

    instance: registry_pb2.Instance
    """Declared fields only; output-only fields are cleared. instance_id may be empty."""

    ttl_ms: int


def register_request(request: registry_pb2.RegisterRequest) -> RegisterSpec:
    """Validate a RegisterRequest and keep only what the caller may set."""
    if not request.HasField("instance"):
        raise invalid_argument("instance", "required")
    given = request.instance
    service_name(given.service, "instance.service")
    if given.instance_id:
        instance_id(given.instance_id, "instance.instance_id")
    address(given.address)
    _label(given.version, "instance.version")
    _label(given.zone, "instance.zone")
    tags(list(given.tags))
    metadata(dict(given.metadata))
    if given.HasField("health_check"):
        health_check(given.health_check)
    ttl = ttl_ms(request)
    declared = registry_pb2.Instance(
        service=given.service,
        instance_id=given.instance_id,
        address=given.address,
        version=given.version,
        zone=given.zone,
        tags=list(given.tags),
        metadata=dict(given.metadata),
    )
    if given.HasField("health_check"):
        declared.health_check.CopyFrom(given.health_check)
    return RegisterSpec(instance=declared, ttl_ms=ttl)


def instance_key(service: str, instance: str) -> tuple[str, str]:
    """Validate the (service, instance_id) pair of Deregister and ReportHealth."""
    return service_name(service), instance_id(instance)


def lease_id(value: str, field: str = "lease_id") -> str:
    """A lease id must be given."""
    if not value:
        raise invalid_argument(field, "required")
    if len(value) > MAX_INSTANCE_ID:
        raise invalid_argument(field, f"at most {MAX_INSTANCE_ID} characters")
    return value


def serving_status(value: int, field: str = "status") -> registry_pb2.ServingStatus.ValueType:
    """A known, specified ServingStatus."""
    if value not in (registry_pb2.SERVING_STATUS_SERVING, registry_pb2.SERVING_STATUS_NOT_SERVING):
        raise invalid_argument(field, f"must be SERVING or NOT_SERVING, got {value}")
    return registry_pb2.ServingStatus.ValueType(value)


def resolve_request(request: registry_pb2.ResolveRequest) -> None:
    """Check the filters of a ResolveRequest."""
    service_name(request.service)
    tags(list(request.tags), "tags")
    _label(request.zone, "zone")
    _label(request.version, "version")
    metadata(dict(request.metadata), "metadata")


def page_size(value: int, field: str = "page_size") -> int:
    """0 means 100; at most 1000."""
    if value < 0 or value > 1000:
        raise invalid_argument(field, f"must be 0-1000, got {value}")
    return value or 100


def watch_request(request: registry_pb2.WatchRequest) -> None:
    """Check the service filter and resume revision of a WatchRequest."""
    if request.service:
        service_name(request.service)
    if request.after_revision < 0:
        raise invalid_argument("after_revision", f"must be >= 0, got {request.after_revision}")
