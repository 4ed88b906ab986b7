"""The Registry's data: stored instances, watch events and the change a decision produces.

Everything here is plain data. Instances are kept as ``registry_pb2.Instance``
messages with every output-only field filled in, so the same object is what
the store persists, what the view serves and what watchers receive.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from rpcmesh.v1 import registry_pb2

PUT = registry_pb2.WATCH_EVENT_TYPE_PUT
DELETE = registry_pb2.WATCH_EVENT_TYPE_DELETE
HEALTH = registry_pb2.WATCH_EVENT_TYPE_HEALTH

REASON_DEREGISTERED = "deregistered"
REASON_EXPIRED = "expired"

ResultT = TypeVar("ResultT")


def new_token() -> str:
    """A fresh lease token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def new_id() -> str:
    """A fresh server-assigned identifier (instance or lease id)."""
    return secrets.token_hex(12)


def hash_token(token: str) -> str:
    """What the store keeps instead of the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token_hash: str, token: str) -> bool:
    """Constant-time check of a presented token against a stored hash."""
    return bool(token) and hmac.compare_digest(token_hash, hash_token(token))


@dataclass(frozen=True)
class StoredInstance:
    """One registered instance as the store keeps it."""

    instance: registry_pb2.Instance
    """The instance with every output-only field (lease, revisions, health) filled in."""

    token_hash: str
    """SHA-256 of the lease token; the token itself is never stored."""

    ttl_ms: int
    """Lease TTL in milliseconds."""

    probe_passing: bool = True
    """Damped verdict of the active grpc.health.v1 probes (True when not probed)."""

    @property
    def key(self) -> tuple[str, str]:
        """(service, instance_id)."""
        return self.instance.service, self.instance.instance_id

    @property
    def lease_id(self) -> str:
        """The lease that holds this instance."""
        return self.instance.lease_id


@dataclass(frozen=True)
class Event:
    """One change of the registry, at one revision."""

    revision: int
    type: registry_pb2.WatchEventType.ValueType
    instance: registry_pb2.Instance
    """The instance after the change; for DELETE its last state."""
    reason: str = ""

    def to_proto(self) -> registry_pb2.WatchEvent:
        """The wire form of this event."""
        return registry_pb2.WatchEvent(
            type=self.type, instance=self.instance, revision=self.revision, reason=self.reason
        )

    @classmethod
    def from_proto(cls, event: registry_pb2.WatchEvent) -> Event:
        """Parse the wire (and stored) form."""
        return cls(revision=event.revision, type=event.type, instance=event.instance, reason=event.reason)


@dataclass(frozen=True)
class Change(Generic[ResultT]):
    """What a decision wants the store to do with one instance, and what to answer.

    ``event`` None means nothing changes (no revision is used); ``renew`` then
    still asks the store to restart the lease's TTL.
    """

    stored: StoredInstance | None
    """New state of the instance; None deletes it."""

    event: Event | None
    """The event to append, or None for a no-op."""

    result: ResultT
    """What the RPC answers when the change commits."""

    renew: bool = False
    """Restart the lease TTL (register and update do)."""


@dataclass(frozen=True)
class Committed(Generic[ResultT]):
    """A change after it committed: its result and the revision the registry is at."""

    result: ResultT
    revision: int
    event: Event | None = field(default=None)
