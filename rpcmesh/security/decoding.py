"""Bad request bytes answer INVALID_ARGUMENT, naming what is wrong, instead of grpc-aio's UNKNOWN.

grpc-aio deserializes a request before any handler code runs; when protobuf refuses the bytes
(truncated or corrupt wire format, invalid UTF-8 in a string field) it aborts the call with
UNKNOWN and logs a full traceback for every such message, so one fuzzing client can fill a log.
:func:`tolerant_deserializer` turns a failed decode into an :class:`Undecodable` value instead,
and :func:`reject_bad_requests` wraps a handler so that such a value (and a message holding an
enum number its contract does not define) is refused with INVALID_ARGUMENT before the handler
sees it, logging at most one line per client per minute.

Unknown enum numbers: proto3 enums are open, so protobuf keeps a number it does not know (e.g.
``reported_status=99``). rpcmesh's handlers would treat it as some default; refusing it names the
field instead. The walk visits only fields through which an enum can be reached (worked out once
per message type), so messages without enums cost nothing.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf import descriptor as _descriptor
from google.protobuf.message import DecodeError, Message

__all__ = ["Undecodable", "enum_problem", "reject_bad_requests", "tolerant_deserializer"]

logger = logging.getLogger(__name__)

Handler = Callable[..., Any]
Context = grpc.aio.ServicerContext[Any, Any]
Deserializer = Callable[[bytes], Any]

LOG_INTERVAL_S = 60.0
"""At most one log line per client (peer) per this many seconds."""

_MAX_TRACKED_PEERS = 10_000
_FieldDescriptor = _descriptor.FieldDescriptor


class Undecodable:
    """What a request deserialized to when protobuf refused its bytes."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def tolerant_deserializer(deserializer: Deserializer | None) -> Deserializer | None:
    """``deserializer``, answering :class:`Undecodable` instead of raising DecodeError."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return Undecodable(str(exc) or "undecodable request")

    return deserialize


# Per message type: the fields through which an enum value can be reached (empty: none).
_ENUM_PATHS: dict[str, tuple[_descriptor.FieldDescriptor, ...]] = {}


def _enum_fields(message_type: Any) -> tuple[_descriptor.FieldDescriptor, ...]:
    cached = _ENUM_PATHS.get(message_type.full_name)
    if cached is not None:
        return cached
    _ENUM_PATHS[message_type.full_name] = ()  # a recursive type reaches itself: no enums until proven
    fields = tuple(
        field
        for field in message_type.fields
        if field.type == _FieldDescriptor.TYPE_ENUM
        or (
            field.type == _FieldDescriptor.TYPE_MESSAGE
            and field.message_type is not None
            and _enum_fields(field.message_type)
        )
    )
    _ENUM_PATHS[message_type.full_name] = fields
    return fields


def enum_problem(message: Message, prefix: str = "") -> str | None:
    """The path of the first field holding an enum number its type does not define, else None."""
    for field in _enum_fields(message.DESCRIPTOR):
        name = prefix + field.name
        repeated = field.is_repeated
        enum_type = field.enum_type
        if enum_type is not None:
            known = enum_type.values_by_number
            values = list(getattr(message, field.name)) if repeated else [getattr(message, field.name)]
            for index, value in enumerate(values):
                if value not in known:
                    where = f"{name}[{index}]" if repeated else name
                    return f"{where}: {value} is not a {enum_type.name} value"
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entries = getattr(message, field.name)
            for key in entries:
                found = enum_problem(entries[key], f"{name}[{key}].")
                if found is not None:
                    return found
            continue
        if repeated:
            for index, item in enumerate(getattr(message, field.name)):
                found = enum_problem(item, f"{name}[{index}].")
                if found is not None:
                    return found
        elif message.HasField(field.name):
            found = enum_problem(getattr(message, field.name), f"{name}.")
            if found is not None:
                return found
    return None


_last_logged: dict[str, float] = {}


def _log_refusal(context: Context, method: str, reason: str) -> None:
    peer = context.peer() or "unknown"
    now = time.monotonic()
    if now - _last_logged.get(peer, -LOG_INTERVAL_S) < LOG_INTERVAL_S:
        return
    if len(_last_logged) >= _MAX_TRACKED_PEERS:
        _last_logged.clear()
    _last_logged[peer] = now
    logger.warning(
        "refused a bad request to %s from %s: %s (at most one line a minute per client)", method, peer, reason
    )


def _problem(request: Any) -> str | None:
    if isinstance(request, Undecodable):
        return f"request: cannot be decoded: {request.reason}"
    if isinstance(request, Message):
        return enum_problem(request)
    return None


async def _refuse(context: Context, method: str, problem: str) -> NoReturn:
    _log_refusal(context, method, problem)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def reject_bad_requests(method: str, behavior: Handler, *, stream_requests: bool) -> Handler:
    """``behavior`` behind a check that refuses undecodable requests and unknown enum numbers.

    Streams are checked message by message as the handler reads them: the status is sent at
    once, from whichever task reads, and the handler never sees the bad message.
    """
    if stream_requests:

        async def checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for request in requests:
                problem = _problem(request)
                if problem is not None:
                    await _refuse(context, method, problem)
                yield request

        if inspect.isasyncgenfunction(behavior):

            async def stream_generator(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
                async for response in behavior(checked(requests, context), context):
                    yield response

            return stream_generator

        async def stream_call(requests: AsyncIterator[Any], context: Context) -> Any:
            return await behavior(checked(requests, context), context)

        return stream_call

    if inspect.isasyncgenfunction(behavior):

        async def unary_generator(request: Any, context: Context) -> AsyncIterator[Any]:
            problem = _problem(request)
            if problem is not None:
                await _refuse(context, method, problem)
            async for response in behavior(request, context):
                yield response

        return unary_generator

    async def unary_call(request: Any, context: Context) -> Any:
        problem = _problem(request)
        if problem is not None:
            await _refuse(context, method, problem)
        return await behavior(request, context)

    return unary_call
