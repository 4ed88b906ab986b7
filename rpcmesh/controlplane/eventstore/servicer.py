"""The rpcmesh.v1.EventStore gRPC servicer: validation, conversion, subscriptions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc.aio
from google.protobuf import timestamp_pb2

from rpcmesh.controlplane.eventstore.group import DuplicateEvents, repeated_id
from rpcmesh.controlplane.eventstore.model import (
    ANY,
    COORDINATOR_STREAM_PREFIXES,
    MAX_PAGE_SIZE,
    NO_STREAM,
    STREAM_EXISTS,
    NewEvent,
    StoredEvent,
    WrongExpectedVersion,
    clamp_page_size,
    decode_page_token,
    encode_page_token,
)
from rpcmesh.controlplane.eventstore.storage import EventStorage
from rpcmesh.errors import (
    FailedPreconditionError,
    PermissionDeniedError,
    invalid_argument,
    register_detail_type,
)
from rpcmesh.v1 import eventstore_pb2 as pb
from rpcmesh.v1 import eventstore_pb2_grpc as pb_grpc

register_detail_type(pb.WrongExpectedVersion)

MAX_STREAM_NAME = 512
MAX_EVENT_TYPE = 256
MAX_EVENT_ID = 128
MAX_EVENTS_PER_APPEND = 10_000
MAX_FILTER_ENTRIES = 100
# Subscribers re-check the store at least this often, which also picks up
# appends made by other nodes sharing a PostgreSQL store.
SUBSCRIPTION_POLL_SECONDS = 1.0

_EXPECTED_STATES = {
    pb.EXPECTED_STATE_ANY: ANY,
    pb.EXPECTED_STATE_NO_STREAM: NO_STREAM,
    pb.EXPECTED_STATE_STREAM_EXISTS: STREAM_EXISTS,
}


def validate_stream_name(field: str, name: str) -> None:
    """Stream names are non-empty printable text of bounded length."""
    if not name:
        raise invalid_argument(field, "must not be empty")
    if len(name) > MAX_STREAM_NAME:
        raise invalid_argument(field, f"at most {MAX_STREAM_NAME} characters")
    if any(ord(ch) < 0x20 for ch in name):
        raise invalid_argument(field, "must not contain control characters")


def expected_from_request(request: pb.AppendToStreamRequest) -> int:
    """The expected version of an append; INVALID_ARGUMENT when absent or negative."""
    which = request.WhichOneof("expected")
    if which == "expected_revision":
        if request.expected_revision < 0:
            raise invalid_argument("expected_revision", "must be >= 0 (use expected_state for the markers)")
        return int(request.expected_revision)
    if which == "expected_state" and request.expected_state in _EXPECTED_STATES:
        return _EXPECTED_STATES[request.expected_state]
    raise invalid_argument(
        "expected_state", "set expected_state (ANY, NO_STREAM, STREAM_EXISTS) or expected_revision"
    )


def events_from_request(events: Sequence[pb.EventData]) -> list[NewEvent]:
    """Validate and convert the events of an append; server-assigns empty ids; ids must not repeat."""
    if len(events) > MAX_EVENTS_PER_APPEND:
        raise invalid_argument("events", f"at most {MAX_EVENTS_PER_APPEND} events per append")
    converted = []
    for index, event in enumerate(events):
        if not event.event_type:
            raise invalid_argument(f"events[{index}].event_type", "must not be empty")
        if len(event.event_type) > MAX_EVENT_TYPE:
            raise invalid_argument(f"events[{index}].event_type", f"at most {MAX_EVENT_TYPE} characters")
        if len(event.event_id) > MAX_EVENT_ID:
            raise invalid_argument(f"events[{index}].event_id", f"at most {MAX_EVENT_ID} characters")
        texts = {
            "event_type": event.event_type,
            "event_id": event.event_id,
            "content_type": event.content_type,
        }
        texts.update({f"metadata[{key!r}]": f"{key}{value}" for key, value in event.metadata.items()})
        for name, text in texts.items():
            if "\x00" in text:  # PostgreSQL text cannot hold it; both backends refuse it alike
                raise invalid_argument(f"events[{index}].{name}", "must not contain NUL characters")
        converted.append(
            NewEvent(
                event_id=event.event_id or NewEvent.new_id(),
                id_assigned=not event.event_id,
                event_type=event.event_type,
                data=event.data,
                content_type=event.content_type,
                metadata=dict(event.metadata),
            )
        )
    twice = repeated_id(converted)
    if twice is not None:
        raise invalid_argument(f"events[{twice[1]}].event_id", f"repeats events[{twice[0]}].event_id")
    return converted


def validate_filter(field: str, flt: pb.ReadAllFilter) -> None:
    """Bounded, non-empty filter entries."""
    if len(flt.event_types) > MAX_FILTER_ENTRIES:
        raise invalid_argument(f"{field}.event_types", f"at most {MAX_FILTER_ENTRIES} entries")
    if len(flt.stream_prefixes) > MAX_FILTER_ENTRIES:
        raise invalid_argument(f"{field}.stream_prefixes", f"at most {MAX_FILTER_ENTRIES} entries")
    for index, value in enumerate(flt.event_types):
        if not value:
            raise invalid_argument(f"{field}.event_types[{index}]", "must not be empty")
    for index, value in enumerate(flt.stream_prefixes):
        if not value:
            raise invalid_argument(f"{field}.stream_prefixes[{index}]", "must not be empty")


def to_recorded(event: StoredEvent) -> pb.RecordedEvent:
    """StoredEvent as the wire message."""
    recorded_at = timestamp_pb2.Timestamp()
    recorded_at.FromNanoseconds(int(event.recorded_at * 1e9))
    return pb.RecordedEvent(
        stream=event.stream,
        event_id=event.event_id,
        event_type=event.event_type,
        stream_revision=event.revision,
        position=event.position,
        data=event.data,
        content_type=event.content_type,
        metadata=dict(event.metadata),
        recorded_at=recorded_at,
    )


def _check_page_size(field: str, value: int) -> int:
    if value < 0:
        raise invalid_argument(field, f"must be between 0 and {MAX_PAGE_SIZE}")
    return clamp_page_size(value)


def _filter_scope(flt: pb.ReadAllFilter) -> str:
    return "|".join(sorted(flt.event_types)) + "#" + "|".join(sorted(flt.stream_prefixes))


class EventStoreServicer(pb_grpc.EventStoreServicer):
    """Serves rpcmesh.v1.EventStore over an EventStorage."""

    def __init__(self, storage: EventStorage) -> None:
        self.storage = storage

    async def AppendToStream(
        self, request: pb.AppendToStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AppendToStreamResponse:
        """Append a batch atomically at the expected version."""
        validate_stream_name("stream", request.stream)
        if request.stream.startswith(COORDINATOR_STREAM_PREFIXES):
            # An event the coordinator did not write would be folded into a saga (or a definition).
            raise PermissionDeniedError(
                f"stream: {request.stream!r} belongs to the SagaCoordinator; streams starting with 'saga-' "
                "or 'sagadef-' are written through its API only"
            )
        expected = expected_from_request(request)
        events = events_from_request(request.events)
        try:
            result = await self.storage.append(request.stream, expected, events)
        except WrongExpectedVersion as exc:
            raise FailedPreconditionError(
                str(exc),
                details=[
                    pb.WrongExpectedVersion(
                        stream=exc.stream,
                        current_revision=exc.current_revision,
                        stored_event_ids=exc.stored_ids if isinstance(exc, DuplicateEvents) else [],
                    )
                ],
            ) from exc
        return pb.AppendToStreamResponse(
            current_revision=result.current_revision, position=result.position, appended=result.appended
        )

    async def ReadStream(
        self, request: pb.ReadStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReadStreamResponse:
        """Read one stream, forwards or backwards, one page."""
        validate_stream_name("stream", request.stream)
        backwards = request.direction == pb.READ_DIRECTION_BACKWARDS
        if request.direction not in (
            pb.READ_DIRECTION_UNSPECIFIED,
            pb.READ_DIRECTION_FORWARDS,
            pb.READ_DIRECTION_BACKWARDS,
        ):
            raise invalid_argument("direction", "unknown direction")
        limit = _check_page_size("page_size", request.page_size)
        start = request.from_revision
        if request.page_token:
            try:
                start = decode_page_token(request.page_token, "b" if backwards else "f", request.stream)
            except ValueError as exc:
                raise invalid_argument("page_token", str(exc)) from exc
        elif start < (-1 if backwards else 0):
            raise invalid_argument("from_revision", "must be >= 0 (backwards: -1 for the end)")
        events, current = await self.storage.read_stream(
            request.stream, start, backwards=backwards, limit=limit
        )
        token = ""
        if len(events) == limit:
            following = events[-1].revision + (-1 if backwards else 1)
            if following >= 0 and (backwards or following <= current):
                token = encode_page_token("b" if backwards else "f", request.stream, following)
        return pb.ReadStreamResponse(
            events=[to_recorded(e) for e in events], next_page_token=token, current_revision=current
        )

    async def ReadAll(
        self, request: pb.ReadAllRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReadAllResponse:
        """Read the global log from a position, filtered, one page."""
        validate_filter("filter", request.filter)
        limit = _check_page_size("page_size", request.page_size)
        start = request.from_position
        if request.page_token:
            try:
                start = decode_page_token(request.page_token, "a", _filter_scope(request.filter))
            except ValueError as exc:
                raise invalid_argument("page_token", str(exc)) from exc
        elif start < 0:
            raise invalid_argument("from_position", "must be >= 0")
        events, head = await self.storage.read_all(
            max(start, 1),
            limit=limit,
            event_types=list(request.filter.event_types),
            stream_prefixes=list(request.filter.stream_prefixes),
        )
        token = ""
        if len(events) == limit and events[-1].position < head:
            token = encode_page_token("a", _filter_scope(request.filter), events[-1].position + 1)
        return pb.ReadAllResponse(
            events=[to_recorded(e) for e in events], next_page_token=token, last_position=head
        )

    async def SubscribeToStream(
        self, request: pb.SubscribeToStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.SubscribeToStreamResponse]:
        """Catch up on one stream after a revision, then follow it live."""
        validate_stream_name("stream", request.stream)
        if request.after_revision < -1:
            raise invalid_argument("after_revision", "must be >= -1")
        after = request.after_revision
        caught_up = False
        while True:
            head = await self.storage.head()
            events, _ = await self.storage.read_stream(
                request.stream, after + 1, backwards=False, limit=MAX_PAGE_SIZE
            )
            full = len(events) == MAX_PAGE_SIZE
            if events:
                after = events[-1].revision
            if events or (not full and not caught_up):
                caught_up = caught_up or not full
                yield pb.SubscribeToStreamResponse(
                    events=[to_recorded(e) for e in events], caught_up=caught_up
                )
            if not full:
                await self.storage.wait_for_append(head, SUBSCRIPTION_POLL_SECONDS)

    async def SubscribeToAll(
        self, request: pb.SubscribeToAllRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.SubscribeToAllResponse]:
        """Catch up on the global log after a position, then follow it live, with checkpoints."""
        validate_filter("filter", request.filter)
        if request.after_position < 0:
            raise invalid_argument("after_position", "must be >= 0")
        after = request.after_position
        caught_up = False
        while True:
            events, head = await self.storage.read_all(
                after + 1,
                limit=MAX_PAGE_SIZE,
                event_types=list(request.filter.event_types),
                stream_prefixes=list(request.filter.stream_prefixes),
            )
            full = len(events) == MAX_PAGE_SIZE
            checkpoint = events[-1].position if full else max(head, after)
            moved = checkpoint > after
            after = checkpoint
            if events or moved or (not full and not caught_up):
                caught_up = caught_up or not full
                yield pb.SubscribeToAllResponse(
                    events=[to_recorded(e) for e in events], caught_up=caught_up, checkpoint=checkpoint
                )
            if not full:
                await self.storage.wait_for_append(after, SUBSCRIPTION_POLL_SECONDS)
