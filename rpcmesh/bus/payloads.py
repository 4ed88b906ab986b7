"""Typed payloads: protobuf messages in and out of bus messages.

A typed payload travels as the message's serialized bytes with the content type
``application/x-protobuf; messageType=<full name>``, the same convention as
:mod:`rpcmesh.v1.common` ``Payload``, so any gRPC client can read it.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import Message

from rpcmesh.errors import InvalidArgumentError
from rpcmesh.v1 import bus_pb2

M = TypeVar("M", bound=Message)

PROTOBUF_CONTENT_TYPE = "application/x-protobuf"


def content_type_of(kind: type[Message] | Message) -> str:
    """The content type naming a protobuf message type."""
    return f"{PROTOBUF_CONTENT_TYPE}; messageType={kind.DESCRIPTOR.full_name}"


def encode(value: Message | bytes | str, content_type: str = "") -> tuple[bytes, str]:
    """Bytes and content type for a payload: a protobuf message, raw bytes or text."""
    if isinstance(value, Message):
        return value.SerializeToString(), content_type or content_type_of(value)
    if isinstance(value, str):
        return value.encode(), content_type or "text/plain; charset=utf-8"
    return bytes(value), content_type


def message_type_of(content_type: str) -> str | None:
    """The protobuf full name in a content type, or None."""
    media, _, parameters = content_type.partition(";")
    if media.strip() != PROTOBUF_CONTENT_TYPE:
        return None
    for parameter in parameters.split(";"):
        name, _, value = parameter.strip().partition("=")
        if name == "messageType":
            return value.strip()
    return None


def decode(message: bus_pb2.BusMessage, kind: type[M]) -> M:
    """Parse a bus message's payload as ``kind``; fails when the content type names another type."""
    named = message_type_of(message.content_type)
    if named is not None and named != kind.DESCRIPTOR.full_name:
        raise InvalidArgumentError(
            f"payload: message {message.id} holds {named}, not {kind.DESCRIPTOR.full_name}"
        )
    return kind.FromString(message.payload)
