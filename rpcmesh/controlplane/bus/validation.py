"""Validation of Bus requests and the subscription settings they produce (pure).

Every check names the offending field (``messages[3].payload``,
``open.max_in_flight``) and raises before anything is stored, so bad input
changes nothing. Sizes beyond the limits answer RESOURCE_EXHAUSTED; malformed
values answer INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rpcmesh.controlplane.bus import topics
from rpcmesh.controlplane.bus.group_state import DeliveryPolicy
from rpcmesh.controlplane.bus.store import RetentionPolicy
from rpcmesh.errors import ResourceExhaustedError, StatusError, invalid_argument
from rpcmesh.v1 import bus_pb2


@dataclass(frozen=True, kw_only=True)
class BusLimits:
    """Size limits the Bus enforces on every request."""

    max_payload_bytes: int = 1024 * 1024
    """Largest payload of one message."""

    max_header_bytes: int = 16 * 1024
    """Largest total size of one message's header names and values."""

    max_headers: int = 64
    """Most headers on one message."""

    max_batch: int = 10_000
    """Most messages in one Publish or PublishStream batch."""

    max_id_length: int = 256
    """Longest message id, key or correlation id."""

    max_in_flight: int = 100_000
    """Largest max_in_flight a subscription may ask for."""

    max_error_bytes: int = 1024
    """Longest error (UTF-8 bytes) a nak may give (kept as its message's last error)."""

    def __post_init__(self) -> None:
        for name in (
            "max_payload_bytes",
            "max_header_bytes",
            "max_headers",
            "max_batch",
            "max_id_length",
            "max_error_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")


DEFAULT_MAX_IN_FLIGHT = 256
DEFAULT_MAX_BATCH = 64
DEFAULT_ACK_DEADLINE = 30.0
DEFAULT_MAX_DELIVERIES = 5
DEFAULT_BACKOFF = 1.0
MAX_SERVER_BATCH = 10_000


@dataclass(frozen=True, kw_only=True)
class Start:
    """Where a new group starts reading."""

    kind: str = "new_only"
    """One of ``new_only``, ``earliest``, ``sequence``, ``time``."""
    sequence: int = 0
    """For ``sequence``: the first sequence delivered."""
    time_ns: int = 0
    """For ``time``: deliver messages published at or after this time."""


@dataclass(frozen=True, kw_only=True)
class SubscriptionSettings:
    """A validated ``SubscriptionOptions``."""

    topic: str
    """Topic name or pattern."""
    group: str
    """Group name ('' in broadcast mode)."""
    broadcast: bool
    """True for DELIVERY_MODE_BROADCAST."""
    start: Start
    """Where a new group starts."""
    max_in_flight: int
    """Most unacknowledged deliveries on the stream."""
    max_batch: int
    """Largest batch per response."""
    policy: DeliveryPolicy
    """Ack deadline, max deliveries, backoff."""


def check_topic(field: str, name: str, *, allow_reserved: bool = False) -> None:
    """Raise INVALID_ARGUMENT naming ``field`` when ``name`` is not a topic name."""
    problem = topics.topic_problem(name, allow_reserved=allow_reserved)
    if problem:
        raise invalid_argument(field, problem)


def check_group(field: str, group: str) -> None:
    """Raise INVALID_ARGUMENT naming ``field`` when ``group`` is not a group name."""
    problem = topics.group_problem(group)
    if problem:
        raise invalid_argument(field, problem)


def check_message(field: str, message: bus_pb2.BusMessage, limits: BusLimits) -> None:
    """Validate one message to publish; ``field`` is its path, e.g. ``messages[2]``."""
    if len(message.payload) > limits.max_payload_bytes:
        raise ResourceExhaustedError(
            f"{field}.payload: {len(message.payload)} bytes exceeds the limit of {limits.max_payload_bytes}"
        )
    if len(message.headers) > limits.max_headers:
        raise ResourceExhaustedError(
            f"{field}.headers: {len(message.headers)} headers exceed the limit of {limits.max_headers}"
        )
    header_bytes = sum(len(name) + len(value) for name, value in message.headers.items())
    if header_bytes > limits.max_header_bytes:
        raise ResourceExhaustedError(
            f"{field}.headers: {header_bytes} bytes exceed the limit of {limits.max_header_bytes}"
        )
    for name in message.headers:
        if not name:
            raise invalid_argument(f"{field}.headers", "header names must not be empty")
        if name == topics.REPLAY_GROUP_HEADER:
            # Set by the Bus on a replayed dead letter: a publisher could otherwise hide a message
            # from every group but one.
            raise invalid_argument(f"{field}.headers[{name}]", "is set by the Bus on replays only")
    for attribute in ("id", "key", "correlation_id"):
        if len(getattr(message, attribute)) > limits.max_id_length:
            raise invalid_argument(
                f"{field}.{attribute}", f"must be at most {limits.max_id_length} characters"
            )
    if message.sequence:
        raise invalid_argument(f"{field}.sequence", "is output only; leave it 0")


def check_batch(
    topic: str, messages: Sequence[bus_pb2.BusMessage], limits: BusLimits, *, partial: bool = False
) -> dict[int, StatusError]:
    """Validate a Publish batch.

    Request-level problems always raise. A bad message raises too unless
    ``partial``: then the problems are returned by message index (those
    messages are not to be stored, the others are).
    """
    check_topic("topic", topic)
    if not messages:
        raise invalid_argument("messages", "must hold at least one message")
    if len(messages) > limits.max_batch:
        raise ResourceExhaustedError(
            f"messages: {len(messages)} messages exceed the batch limit of {limits.max_batch}"
        )
    problems: dict[int, StatusError] = {}
    for index, message in enumerate(messages):
        try:
            if message.topic and message.topic != topic:
                raise invalid_argument(
                    f"messages[{index}].topic", "must be empty or equal to the request topic"
                )
            check_message(f"messages[{index}]", message, limits)
        except StatusError as problem:
            if not partial:
                raise
            problems[index] = problem
    return problems


def retention_from_proto(field: str, retention: bus_pb2.Retention) -> RetentionPolicy:
    """A RetentionPolicy from the wire, validated."""
    if retention.max_age.seconds < 0 or retention.max_age.nanos < 0:
        raise invalid_argument(f"{field}.max_age", "must not be negative")
    return RetentionPolicy(
        max_messages=retention.max_messages,
        max_bytes=retention.max_bytes,
        max_age=retention.max_age.ToNanoseconds() / 1e9,
    )


def _seconds(field: str, value: float, default: float, *, allow_zero: bool = False) -> float:
    if value < 0:
        raise invalid_argument(field, "must not be negative")
    if value == 0 and not allow_zero:
        return default
    return value


def subscription_settings(options: bus_pb2.SubscriptionOptions, limits: BusLimits) -> SubscriptionSettings:
    """Validate the first Subscribe request and fill in defaults."""
    problem = topics.pattern_problem(options.topic)
    if problem:
        raise invalid_argument("open.topic", problem)
    mode = options.mode
    if mode not in (
        bus_pb2.DELIVERY_MODE_UNSPECIFIED,
        bus_pb2.DELIVERY_MODE_GROUP,
        bus_pb2.DELIVERY_MODE_BROADCAST,
    ):
        raise invalid_argument("open.mode", f"unknown delivery mode {mode}")
    broadcast = mode == bus_pb2.DELIVERY_MODE_BROADCAST
    if broadcast:
        if options.group:
            raise invalid_argument("open.group", "must be empty in broadcast mode")
    else:
        if not options.group:
            raise invalid_argument("open.group", "is required in group mode")
        check_group("open.group", options.group)
    if options.max_in_flight > limits.max_in_flight:
        raise invalid_argument("open.max_in_flight", f"must be at most {limits.max_in_flight}")
    if options.max_batch > MAX_SERVER_BATCH:
        raise invalid_argument("open.max_batch", f"must be at most {MAX_SERVER_BATCH}")
    ack_deadline = _seconds(
        "open.ack_deadline", options.ack_deadline.ToNanoseconds() / 1e9, DEFAULT_ACK_DEADLINE
    )
    backoff = _seconds(
        "open.redelivery_backoff", options.redelivery_backoff.ToNanoseconds() / 1e9, DEFAULT_BACKOFF
    )
    start = _start(options.start)
    return SubscriptionSettings(
        topic=options.topic,
        group=options.group,
        broadcast=broadcast,
        start=start,
        max_in_flight=options.max_in_flight or DEFAULT_MAX_IN_FLIGHT,
        max_batch=options.max_batch or DEFAULT_MAX_BATCH,
        policy=DeliveryPolicy(
            ack_deadline=ack_deadline,
            max_deliveries=options.max_deliveries or DEFAULT_MAX_DELIVERIES,
            redelivery_backoff=backoff,
        ),
    )


def _start(start: bus_pb2.StartPosition) -> Start:
    which = start.WhichOneof("position")
    if which is None or which == "new_only":
        return Start(kind="new_only")
    if which == "earliest":
        return Start(kind="earliest")
    if which == "sequence":
        if start.sequence < 1:
            raise invalid_argument("open.start.sequence", "must be >= 1")
        return Start(kind="sequence", sequence=start.sequence)
    return Start(kind="time", time_ns=start.time.ToNanoseconds())


def check_refs(field: str, refs: Sequence[bus_pb2.MessageRef]) -> None:
    """Validate the refs of an ack, nak or term."""
    if not refs:
        raise invalid_argument(f"{field}.refs", "must name at least one message")
    for index, ref in enumerate(refs):
        if ref.sequence < 1:
            raise invalid_argument(f"{field}.refs[{index}].sequence", "must be >= 1")
        if not ref.topic:
            raise invalid_argument(f"{field}.refs[{index}].topic", "must not be empty")
