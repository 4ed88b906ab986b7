"""Per-method table: which resources each control-plane request names (pure).

For every control-plane method, a function from one request message to the
:class:`~rpcmesh.security.policy.Access` values the policy must allow. Streams
are checked message by message: the KeepAlive renewals, Subscribe's open, acks
and naks, each PublishStream batch. Methods not in the table are admin-only,
except the public ones (health checking), so a service added later is closed
until it is listed here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rpcmesh.security.policy import ALL, Access, Action

__all__ = ["PUBLIC_METHODS", "accesses_for", "stream_kind"]

Extractor = Callable[[Any], list[Access]]

_REGISTRY = "/rpcmesh.v1.Registry/"
_BUS = "/rpcmesh.v1.Bus/"
_SAGA = "/rpcmesh.v1.SagaCoordinator/"
_EVENTS = "/rpcmesh.v1.EventStore/"

PUBLIC_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
"""Methods any caller may use without credentials (load balancers probe health)."""

_REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


def _one(action: Action, resource: str) -> list[Access]:
    return [Access(action, resource)]


def _bus_message_topics(action: Action, topic: str, messages: Any) -> list[Access]:
    accesses = [Access(action, topic)]
    accesses += [
        Access(action, message.topic) for message in messages if message.topic and message.topic != topic
    ]
    return accesses


def _subscribe(request: Any) -> list[Access]:
    which = request.WhichOneof("action")
    if which == "open":
        accesses = _one(Action.SUBSCRIBE, request.open.topic)
        if request.open.group:
            accesses.append(Access(Action.GROUP, request.open.group))
        return accesses
    if which in ("ack", "nak", "term"):
        refs = getattr(request, which).refs
        return [Access(Action.SUBSCRIBE, topic) for topic in dict.fromkeys(ref.topic for ref in refs)]
    return []


def _read_all(request: Any) -> list[Access]:
    prefixes = list(request.filter.stream_prefixes)
    if not prefixes:
        return _one(Action.READ_STREAM, ALL)
    return [Access(Action.READ_STREAM, prefix) for prefix in prefixes]


def _start_saga(request: Any) -> list[Access]:
    if request.WhichOneof("definition_ref") == "definition":
        return _one(Action.SAGA, request.definition.name)
    return _one(Action.SAGA, request.definition_name)


_TABLE: dict[str, Extractor] = {
    # Registry
    _REGISTRY + "Register": lambda r: _one(Action.REGISTER, r.instance.service),
    _REGISTRY + "Deregister": lambda r: _one(Action.REGISTER, r.service),
    _REGISTRY + "ReportHealth": lambda r: _one(Action.REGISTER, r.service),
    _REGISTRY + "Heartbeat": lambda r: _one(Action.RENEW, r.lease_id),
    _REGISTRY + "KeepAlive": lambda r: _one(Action.RENEW, r.lease_id),
    _REGISTRY + "Resolve": lambda r: _one(Action.DISCOVER, r.service),
    _REGISTRY + "ListServices": lambda r: _one(Action.DISCOVER, ALL),
    _REGISTRY + "Watch": lambda r: _one(Action.DISCOVER, r.service),
    # Bus
    _BUS + "CreateTopic": lambda r: _one(Action.PUBLISH, r.name),
    _BUS + "GetTopic": lambda r: _one(Action.TOPIC_INFO, r.name),
    _BUS + "ListTopics": lambda r: _one(Action.SUBSCRIBE, ">"),
    _BUS + "DeleteTopic": lambda r: _one(Action.ADMIN, r.name),
    _BUS + "Publish": lambda r: _bus_message_topics(Action.PUBLISH, r.topic, r.messages),
    _BUS + "PublishStream": lambda r: _bus_message_topics(Action.PUBLISH, r.topic, r.messages),
    _BUS + "Subscribe": _subscribe,
    _BUS + "Request": lambda r: _bus_message_topics(Action.PUBLISH, r.topic, [r.message]),
    _BUS + "Reply": lambda r: _one(Action.REPLY, r.reply_to),
    _BUS + "PublishEvent": lambda r: _one(Action.PUBLISH, f"events.{r.event_type}"),
    _BUS + "ListDeadLetters": lambda r: [Access(Action.SUBSCRIBE, r.topic), Access(Action.GROUP, r.group)],
    _BUS + "ReplayDeadLetters": lambda r: [Access(Action.SUBSCRIBE, r.topic), Access(Action.GROUP, r.group)],
    _BUS + "PurgeDeadLetters": lambda r: [Access(Action.SUBSCRIBE, r.topic), Access(Action.GROUP, r.group)],
    # SagaCoordinator
    _SAGA + "RegisterDefinition": lambda r: _one(Action.SAGA, r.definition.name),
    _SAGA + "GetDefinition": lambda r: _one(Action.SAGA, r.name),
    _SAGA + "ListDefinitions": lambda r: _one(Action.SAGA, ALL),
    _SAGA + "StartSaga": _start_saga,
    # Without a definition name: any saga permission; the servicer lists only what the caller may see.
    _SAGA + "ListSagas": lambda r: (
        _one(Action.SAGA, r.definition_name) if r.definition_name else _one(Action.SAGA_BY_ID, ALL)
    ),
    _SAGA + "GetSaga": lambda r: _one(Action.SAGA_BY_ID, r.saga_id),
    _SAGA + "WatchSaga": lambda r: _one(Action.SAGA_BY_ID, r.saga_id),
    _SAGA + "AbortSaga": lambda r: _one(Action.SAGA_BY_ID, r.saga_id),
    _SAGA + "RetryCompensation": lambda r: _one(Action.SAGA_BY_ID, r.saga_id),
    _SAGA + "ResolveSaga": lambda r: _one(Action.SAGA_BY_ID, r.saga_id),
    # EventStore
    _EVENTS + "AppendToStream": lambda r: _one(Action.APPEND_STREAM, r.stream),
    _EVENTS + "ReadStream": lambda r: _one(Action.READ_STREAM, r.stream),
    _EVENTS + "SubscribeToStream": lambda r: _one(Action.READ_STREAM, r.stream),
    _EVENTS + "ReadAll": _read_all,
    _EVENTS + "SubscribeToAll": _read_all,
}

_STREAM_KINDS: dict[str, str] = {
    _REGISTRY + "Watch": "watch",
    _SAGA + "WatchSaga": "watch",
    _BUS + "Subscribe": "subscription",
    _EVENTS + "SubscribeToStream": "subscription",
    _EVENTS + "SubscribeToAll": "subscription",
}


def known_methods() -> frozenset[str]:
    """Every method the table covers."""
    return frozenset(_TABLE)


def accesses_for(method: str, request: Any) -> list[Access]:
    """The accesses one request (or one message of a stream) of ``method`` performs."""
    extractor = _TABLE.get(method)
    if extractor is not None:
        return extractor(request)
    if method.startswith(_REFLECTION_PREFIXES):
        return _one(Action.INTROSPECT, ALL)
    return _one(Action.ADMIN, method)


def stream_kind(method: str) -> str | None:
    """``"watch"`` or ``"subscription"`` for the long-lived streams capped per identity, else None."""
    return _STREAM_KINDS.get(method)
