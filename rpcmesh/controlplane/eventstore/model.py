"""EventStore domain values and the pure rules of appending and paging.

Stream revisions count from 0 (``-1``: the stream does not exist); global
positions count from 1. An expected version is one of the ``ANY``,
``NO_STREAM``, ``STREAM_EXISTS`` markers or an exact revision (>= 0).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

ANY: Final = -2
"""Expected version: append whatever the stream's revision."""
NO_STREAM: Final = -1
"""Expected version: the stream must not exist yet."""
STREAM_EXISTS: Final = -4
"""Expected version: the stream must exist."""

SAGA_STREAM_PREFIX: Final = "saga-"
"""A saga's transitions: ``saga-<id>``, written by the SagaCoordinator only."""
DEFINITION_STREAM_PREFIX: Final = "sagadef-"
"""A saga definition's versions: ``sagadef-<name>``, written by the SagaCoordinator only."""
COORDINATOR_STREAM_PREFIXES: Final = (SAGA_STREAM_PREFIX, DEFINITION_STREAM_PREFIX)
"""Streams the EventStore API may read but not append to (an event the coordinator did not write
would be folded into a saga or a definition)."""

compact_json: Final = json.JSONEncoder(separators=(",", ":")).encode
"""JSON without spaces; one encoder for every call (``json.dumps`` with separators builds one each time)."""

DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000


@dataclass(frozen=True, kw_only=True)
class NewEvent:
    """An event to append."""

    event_id: str
    """Unique within the stream; a batch whose ids are all stored is a retry (see group.py)."""
    event_type: str
    """What happened, e.g. ``OrderPlaced``."""
    data: bytes = b""
    """The body."""
    content_type: str = ""
    """Media type of data."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """Trace context, correlation id and the like."""
    id_assigned: bool = False
    """The id was just assigned by this server (a fresh UUID): it cannot be stored yet, so
    the duplicate look-up skips it."""

    @staticmethod
    def new_id() -> str:
        """A fresh server-assigned event id."""
        return str(uuid.uuid4())


@dataclass(frozen=True, kw_only=True)
class StoredEvent:
    """An event as recorded."""

    stream: str
    event_id: str
    event_type: str
    revision: int
    """Revision in the stream, from 0."""
    position: int
    """Position in the global log, from 1."""
    data: bytes
    content_type: str
    metadata: Mapping[str, str]
    recorded_at: float
    """Unix time of the append."""


@dataclass(frozen=True, kw_only=True)
class AppendResult:
    """What an append did."""

    current_revision: int
    """Revision of the batch's last event (a retry: as originally stored; empty batch: the stream's)."""
    position: int
    """Global position of the last event of the batch (a retry: as originally stored; empty: the head)."""
    appended: int
    """Events stored; 0 when the append was a retry of one already stored."""


class WrongExpectedVersion(Exception):
    """The stream is not at the expected version; nothing was appended."""

    def __init__(self, stream: str, expected: int, current_revision: int) -> None:
        super().__init__(
            f"stream {stream!r} is at revision {current_revision}, expected {describe_expected(expected)}"
        )
        self.stream = stream
        self.expected = expected
        self.current_revision = current_revision


def describe_expected(expected: int) -> str:
    """Human-readable expected version."""
    return {ANY: "any", NO_STREAM: "no stream", STREAM_EXISTS: "stream exists"}.get(
        expected, f"revision {expected}"
    )


def expected_matches(expected: int, current_revision: int) -> bool:
    """Whether a stream at ``current_revision`` (-1: absent) satisfies ``expected``."""
    if expected == ANY:
        return True
    if expected == NO_STREAM:
        return current_revision == -1
    if expected == STREAM_EXISTS:
        return current_revision >= 0
    if expected < 0:
        raise ValueError(f"invalid expected version {expected}")
    return current_revision == expected


def prefix_upper_bound(prefix: str) -> str | None:
    """Smallest string greater than every string starting with ``prefix`` (None: no bound).

    With binary (code point) ordering, ``prefix <= s < bound`` selects exactly the
    strings that start with ``prefix``, which an ordinary B-tree index serves.
    """
    chars = list(prefix)
    while chars:
        last = ord(chars[-1])
        if last < 0x10FFFF:
            bumped = last + 1
            if 0xD800 <= bumped <= 0xDFFF:  # surrogates are not valid in UTF-8 text
                bumped = 0xE000
            chars[-1] = chr(bumped)
            return "".join(chars)
        chars.pop()
    return None


def clamp_page_size(requested: int) -> int:
    """0 means the default; larger than the maximum is capped."""
    if requested <= 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def encode_page_token(kind: str, scope: str, value: int) -> str:
    """An opaque token resuming a read of ``kind`` over ``scope`` at ``value``."""
    raw = compact_json({"k": kind, "s": scope, "v": value}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, kind: str, scope: str) -> int:
    """The resume value of a token; ValueError if it is malformed or from another read."""
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, binascii.Error) as exc:
        raise ValueError("malformed page token") from exc
    if not isinstance(body, dict) or body.get("k") != kind or body.get("s") != scope:
        raise ValueError("page token belongs to another read")
    value = body.get("v")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("malformed page token")
    return value
