"""Topic names and subscription patterns: validation and matching (pure).

Topic names are dot-separated tokens of letters, digits, ``_`` and ``-``, as in
NATS subjects. Subscription patterns add ``*`` (exactly one token) and ``>``
(one or more trailing tokens). Names whose first token starts with ``$`` are
reserved for the Bus itself (dead-letter topics); a pattern only matches them
when its first token names them literally.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MAX_TOPIC_LENGTH = 255
"""Longest topic name or pattern, in characters."""

DEAD_LETTER_PREFIX = "$dlq"
"""First token of every dead-letter topic: ``$dlq.<topic>.<group>``."""

REPLAY_GROUP_HEADER = "rpcmesh-replay-group"
"""Header of a replayed dead letter: only this consumer group receives it; every other
group (and every broadcast subscriber) counts it as done without delivering it."""

EVENTS_PREFIX = "events"
"""First token of the topics PublishEvent writes: ``events.<event_type>``."""

_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")
_GROUP = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


def topic_problem(name: str, *, allow_reserved: bool = False) -> str | None:
    """Why ``name`` is not a valid topic name, or None when it is."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_TOPIC_LENGTH:
        return f"must be at most {MAX_TOPIC_LENGTH} characters"
    tokens = name.split(".")
    for index, token in enumerate(tokens):
        if index == 0 and allow_reserved and token == DEAD_LETTER_PREFIX:
            continue
        if not token:
            return "must not have empty tokens (leading, trailing or double dots)"
        if token in ("*", ">"):
            return "wildcards are only allowed in subscription patterns"
        if not _TOKEN.match(token):
            return f"token {token!r} may only hold letters, digits, '_' and '-'"
    return None


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid subscription pattern, or None when it is."""
    if not pattern:
        return "must not be empty"
    if len(pattern) > MAX_TOPIC_LENGTH:
        return f"must be at most {MAX_TOPIC_LENGTH} characters"
    tokens = pattern.split(".")
    for index, token in enumerate(tokens):
        if token == ">":
            if index != len(tokens) - 1:
                return "'>' may only be the last token"
            continue
        if token == "*":
            continue
        if index == 0 and token == DEAD_LETTER_PREFIX:
            continue
        if not token:
            return "must not have empty tokens (leading, trailing or double dots)"
        if not _TOKEN.match(token):
            return f"token {token!r} may only hold letters, digits, '_', '-' or be '*' or '>'"
    return None


def group_problem(group: str) -> str | None:
    """Why ``group`` is not a valid consumer-group name, or None when it is."""
    if not _GROUP.match(group):
        return "must be 1-128 letters, digits, '_' or '-'"
    return None


def is_plain_token(token: str) -> bool:
    """True for one topic token (letters, digits, '_' and '-'): safe in a NATS subject."""
    return bool(_TOKEN.match(token))


def is_pattern(pattern: str) -> bool:
    """True when ``pattern`` holds a wildcard token."""
    return any(token in ("*", ">") for token in pattern.split("."))


def matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches ``pattern`` ('*' one token, '>' the rest)."""
    if pattern == topic:
        return True
    pattern_tokens = pattern.split(".")
    topic_tokens = topic.split(".")
    if topic_tokens[0].startswith("$") and pattern_tokens[0] != topic_tokens[0]:
        return False
    for index, token in enumerate(pattern_tokens):
        if token == ">":
            return len(topic_tokens) > index
        if index >= len(topic_tokens):
            return False
        if token != "*" and token != topic_tokens[index]:
            return False
    return len(topic_tokens) == len(pattern_tokens)


def dead_letter_topic(topic: str, group: str) -> str:
    """The dead-letter topic of ``group`` on ``topic``.

    Group names have no dots, so the last token always names the group.
    """
    return f"{DEAD_LETTER_PREFIX}.{topic}.{group}"


def event_topic(event_type: str) -> str:
    """The topic PublishEvent writes an event of ``event_type`` to."""
    return f"{EVENTS_PREFIX}.{event_type}"


def skipped_by(headers: Mapping[str, str], group: str) -> bool:
    """True when a message is a dead letter replayed into another group than ``group``."""
    target = headers.get(REPLAY_GROUP_HEADER, "")
    return bool(target) and target != group
