"""Authorization policy: what each identity may do on the control plane (pure decision logic).

A policy file (YAML) lists admin identities, which may do everything, and per
identity what it may touch::

    admins: [ops]
    identities:
      order-service:
        services: [order-service]     # register, deregister, renew, report health (globs)
        discover: ["*"]               # resolve and watch these services (globs; default "*")
        publish: ["orders.>"]         # topics, NATS-style: '*' one token, '>' the rest
        subscribe: ["payments.*", "events.>"]
        groups: [order-service, "order-service-*"]  # consumer groups it may join (globs)
        sagas: [place-order]          # start, define, list these sagas (globs)
        calls: [inventory, "payments/Charge"]  # what its saga definitions may call (globs)
        streams: ["order-"]           # event streams it owns: read and append (prefixes)

``services`` defaults to the identity's own name, so a service identity needs
no more than its entry to register itself. ``groups`` defaults to the identity's
name and names starting with it and a dash (``order-service``, ``order-service-audit``):
joining a consumer group takes its messages from the other members, so one
service cannot drain another's group by knowing its name. ``calls`` lists the
``service`` or ``service/Method`` globs (``Method``: the last part of the full
gRPC method; a bare service name covers all its methods) that the steps and
compensations of a saga definition it registers, or starts inline, may call; it
defaults to the identity's ``services``. The coordinator makes those calls on the
starter's behalf, so without this check it would be a confused deputy; it also
tells each participant who started the saga (``x-rpcmesh-saga-started-by``).
An identity that is not listed may do nothing (PERMISSION_DENIED), even with a
valid token or certificate.

Requests name resources through :class:`Access` values (see
:mod:`rpcmesh.security.methods`); :meth:`Policy.check` answers whether every one
of them is allowed, and why not.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ALL",
    "Access",
    "Action",
    "IdentityPermissions",
    "Policy",
    "load_policy",
    "topic_covers",
]

ALL = ""
"""Resource value meaning "every one" (ListServices, watch all, ListDefinitions, read all)."""


class Action(enum.Enum):
    """What a request does to the resource it names."""

    REGISTER = "register"
    """Register, deregister or report health of an instance of a service."""
    RENEW = "renew"
    """Renew a lease (ownership is proven by the lease token)."""
    DISCOVER = "discover"
    """Resolve or watch a service (ALL: the whole catalogue)."""
    PUBLISH = "publish"
    """Publish to a topic (or create it)."""
    SUBSCRIBE = "subscribe"
    """Subscribe to a topic or pattern, ack, nak, handle its dead letters."""
    GROUP = "group"
    """Join a consumer group, list or replay its dead letters (ALL: every group's)."""
    TOPIC_INFO = "topic_info"
    """Read a topic's description: allowed to its publishers and subscribers."""
    REPLY = "reply"
    """Answer a request; the reply address and correlation id are the capability."""
    SAGA = "saga"
    """Define, start or list sagas of a definition (ALL: every definition)."""
    CALL = "call"
    """Have the saga coordinator call ``service/method`` in a step or compensation it defines."""
    SAGA_BY_ID = "saga_by_id"
    """Get, watch, abort or list sagas by id: any saga permission admits the call; the coordinator
    then checks the saga's own definition (SAGA) before it answers, and lists only those."""
    READ_STREAM = "read_stream"
    """Read or subscribe to event streams starting with the resource (ALL: every stream)."""
    APPEND_STREAM = "append_stream"
    """Append to an event stream."""
    INTROSPECT = "introspect"
    """Server reflection: any listed identity."""
    ADMIN = "admin"
    """Only admins (deleting topics, unknown methods)."""


@dataclass(frozen=True)
class Access:
    """One action on one named resource that a request performs."""

    action: Action
    resource: str


def topic_covers(allowed: str, requested: str) -> bool:
    """Whether the allowed topic pattern covers every topic the requested name or pattern can match.

    ``*`` covers one token (a literal or ``*``), ``>`` covers one or more
    trailing tokens of any kind. As in the Bus, reserved topics (first token
    starting with ``$``) are only covered by a pattern naming that token.
    """
    allowed_tokens, requested_tokens = allowed.split("."), requested.split(".")
    if requested_tokens[0].startswith("$") and allowed_tokens[0] != requested_tokens[0]:
        return False
    for index, token in enumerate(allowed_tokens):
        if token == ">":
            return len(requested_tokens) > index
        if index >= len(requested_tokens) or requested_tokens[index] == ">":
            return False
        if token != "*" and token != requested_tokens[index]:
            return False
    return len(requested_tokens) == len(allowed_tokens)


def _glob_allows(patterns: Sequence[str], resource: str) -> bool:
    if resource == ALL:
        return "*" in patterns
    return any(fnmatch.fnmatchcase(resource, pattern) for pattern in patterns)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{where}: expected a list of strings")
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class IdentityPermissions:
    """What one identity may do; every field is a tuple of patterns."""

    services: tuple[str, ...] = ()
    """Services whose instances it may register, deregister, renew and report on (globs)."""

    discover: tuple[str, ...] = ("*",)
    """Services it may resolve and watch (globs); ``*`` also allows listing and watching all."""

    publish: tuple[str, ...] = ()
    """Topic patterns it may publish to."""

    subscribe: tuple[str, ...] = ()
    """Topic patterns it may subscribe to."""

    groups: tuple[str, ...] = ()
    """Consumer groups it may join and whose dead letters it may read and replay (globs)."""

    sagas: tuple[str, ...] = ()
    """Saga definitions it may define, start and list (globs)."""

    calls: tuple[str, ...] = ()
    """``service`` or ``service/method`` globs its saga definitions' steps may call."""

    streams: tuple[str, ...] = ()
    """Prefixes of the event streams it owns (read and append); ``""`` owns every stream."""

    def allows(self, access: Access) -> bool:
        """Whether this identity may perform ``access``."""
        action, resource = access.action, access.resource
        if action is Action.REGISTER:
            return resource != ALL and _glob_allows(self.services, resource)
        if action is Action.RENEW:
            return bool(self.services)
        if action is Action.DISCOVER:
            return _glob_allows(self.discover, resource)
        if action is Action.PUBLISH:
            return any(topic_covers(pattern, resource) for pattern in self.publish)
        if action is Action.SUBSCRIBE:
            return any(topic_covers(pattern, resource) for pattern in self.subscribe)
        if action is Action.GROUP:
            return _glob_allows(self.groups, resource)
        if action is Action.TOPIC_INFO:
            return any(topic_covers(pattern, resource) for pattern in (*self.publish, *self.subscribe))
        if action is Action.SAGA:
            return _glob_allows(self.sagas, resource)
        if action is Action.CALL:
            service = resource.split("/", 1)[0]
            return any(
                fnmatch.fnmatchcase(resource if "/" in pattern else service, pattern)
                for pattern in self.calls
            )
        if action is Action.SAGA_BY_ID:
            return bool(self.sagas)
        if action in (Action.READ_STREAM, Action.APPEND_STREAM):
            if action is Action.APPEND_STREAM and resource == ALL:
                return False
            return any(resource.startswith(prefix) for prefix in self.streams)
        return action in (Action.REPLY, Action.INTROSPECT)


@dataclass(frozen=True, kw_only=True)
class Policy:
    """Admins and per-identity permissions; anything not granted is denied."""

    admins: frozenset[str] = frozenset()
    """Identities that may do everything."""

    identities: Mapping[str, IdentityPermissions] = field(default_factory=dict)
    """Permissions of each listed identity."""

    allow_all: bool = False
    """Every authenticated identity may do everything (used when no policy file is given)."""

    def check(self, identity: str, accesses: Iterable[Access]) -> str | None:
        """None when ``identity`` may perform every access, else why not (for PERMISSION_DENIED)."""
        if self.allow_all or identity in self.admins:
            return None
        permissions = self.identities.get(identity)
        for access in accesses:
            if permissions is None:
                return f"identity {identity!r} is not in the policy"
            if not permissions.allows(access):
                target = access.resource or "everything"
                return f"identity {identity!r} may not {access.action.value} {target!r}"
        return None

    @classmethod
    def from_mapping(cls, data: Any) -> Policy:
        """Build a policy from parsed YAML; ValueError names the offending field."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError("policy: expected a mapping with 'admins' and 'identities'")
        unknown = set(data) - {"admins", "identities"}
        if unknown:
            raise ValueError(f"policy: unknown keys {sorted(unknown)}")
        admins = frozenset(_strings(data.get("admins"), "admins"))
        raw_identities = data.get("identities") or {}
        if not isinstance(raw_identities, dict):
            raise ValueError("identities: expected a mapping of identity to permissions")
        identities: dict[str, IdentityPermissions] = {}
        fields = {"services", "discover", "publish", "subscribe", "groups", "sagas", "calls", "streams"}
        for name, raw in raw_identities.items():
            where = f"identities.{name}"
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: identity names must be non-empty strings")
            raw = raw or {}
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: expected a mapping")
            extra = set(raw) - fields
            if extra:
                raise ValueError(f"{where}: unknown keys {sorted(extra)}")
            kwargs: dict[str, tuple[str, ...]] = {
                key: _strings(raw[key], f"{where}.{key}") for key in fields if key in raw
            }
            kwargs.setdefault("services", (name,))
            kwargs.setdefault("groups", (name, f"{name}-*"))
            kwargs.setdefault("calls", kwargs["services"])
            for key in ("publish", "subscribe"):
                for pattern in kwargs.get(key, ()):
                    tokens = pattern.split(".")
                    if not pattern or any(not token for token in tokens) or ">" in tokens[:-1]:
                        raise ValueError(f"{where}.{key}: {pattern!r} is not a topic pattern")
            identities[name] = IdentityPermissions(**kwargs)
        return cls(admins=admins, identities=identities)


def load_policy(path: Path) -> Policy:
    """Read and validate a YAML policy file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"policy file: cannot read {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"policy file {path}: not valid YAML: {exc}") from exc
    return Policy.from_mapping(data)
