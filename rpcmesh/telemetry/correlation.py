"""The correlation id: one id per request, across calls, messages and saga steps.

``correlation_id()`` is readable anywhere in a handler. It lives in a contextvar
(so each asyncio task and each thread sees its own), is created at the first hop
when the caller sent none, travels as W3C baggage (``rpcmesh.correlation_id``)
and as the plain ``x-correlation-id`` metadata key (for callers without
OpenTelemetry), is set as the ``rpcmesh.correlation_id`` attribute on every span
rpcmesh creates, and is added to log records by ``install_log_correlation``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar, Token
from typing import Any

CORRELATION_METADATA_KEY = "x-correlation-id"
"""gRPC metadata key and message header carrying the id in plain text."""

CORRELATION_BAGGAGE_KEY = "rpcmesh.correlation_id"
"""W3C baggage entry carrying the id."""

CORRELATION_ATTRIBUTE = "rpcmesh.correlation_id"
"""Span attribute holding the id on every span rpcmesh creates."""

MAX_CORRELATION_ID_LENGTH = 128
"""Longer incoming ids are ignored (a new one is made), so a caller cannot bloat every span and log line."""

_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=@-]*")
_current: ContextVar[str | None] = ContextVar("rpcmesh_correlation_id", default=None)
_ids = random.Random()  # seeded from os.urandom; re-seeded in forked children so they never share ids
os.register_at_fork(after_in_child=_ids.seed)


def correlation_id() -> str | None:
    """The correlation id of the request being handled, or None outside any request."""
    return _current.get()


def new_correlation_id() -> str:
    """A fresh random correlation id (32 hex digits).

    From a PRNG seeded once from the OS (an id must be unique, not secret): ``os.urandom`` per
    call is a system call, which costs several microseconds in a sandboxed process.
    """
    return f"{_ids.getrandbits(128):032x}"


def is_valid_correlation_id(value: str | None) -> bool:
    """Whether an incoming id can be adopted: 1-128 characters, safe in baggage, headers and logs."""
    return (
        value is not None
        and 0 < len(value) <= MAX_CORRELATION_ID_LENGTH
        and _VALID.fullmatch(value) is not None
    )


def choose_correlation_id(*candidates: str | None) -> str:
    """The first valid candidate (e.g. metadata, then baggage), or a new id when none is valid."""
    for candidate in candidates:
        if candidate is not None:
            if candidate.isalnum() and candidate.isascii() and len(candidate) <= MAX_CORRELATION_ID_LENGTH:
                return candidate  # the usual id (hex digits): valid without the pattern
            candidate = candidate.strip()
            if is_valid_correlation_id(candidate):
                return candidate
    return new_correlation_id()


def set_correlation_id(value: str) -> Token[str | None]:
    """Make ``value`` the current id; pass the token to ``reset_correlation_id`` to undo."""
    return _current.set(value)


def reset_correlation_id(token: Token[str | None]) -> None:
    """Undo a ``set_correlation_id``; tolerant of tokens from another context (a closed generator)."""
    with contextlib.suppress(ValueError):
        _current.reset(token)


@contextlib.contextmanager
def use_correlation_id(value: str | None = None) -> Iterator[str]:
    """Run a block under a correlation id: ``value``, the current one, or a new one.

    Example:
        >>> with use_correlation_id() as cid:
        ...     await stub.Echo(request)  # carries cid
    """
    chosen = value or _current.get() or new_correlation_id()
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        reset_correlation_id(token)


class CorrelationIdFilter(logging.Filter):
    """Adds ``correlation_id``, ``trace_id`` and ``span_id`` to log records ("-" when there is none).

    Use in a format string: ``%(asctime)s %(correlation_id)s %(name)s %(message)s``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate the record; never drops it."""
        _annotate(record)
        return True


def _annotate(record: logging.LogRecord) -> None:
    if getattr(record, "correlation_id", None) is not None:
        return
    record.correlation_id = _current.get() or "-"
    # Imported here: the trace API is cheap, but this module must not need it to import.
    from opentelemetry import trace

    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        record.trace_id = format(span_context.trace_id, "032x")
        record.span_id = format(span_context.span_id, "016x")
    else:
        record.trace_id = "-"
        record.span_id = "-"


_FILTER = CorrelationIdFilter()
_installed_factory: Callable[..., logging.LogRecord] | None = None
_previous_factory: Callable[..., logging.LogRecord] | None = None


def install_log_correlation(logger_name: str = "rpcmesh") -> None:
    """Add the correlation id (and trace/span ids) to every log record; idempotent.

    A filter on a logger does not see records of its child loggers (``rpcmesh.client``
    logs past the ``rpcmesh`` logger's filters), so besides the filter on ``logger_name``
    this wraps the log record factory once, which annotates every record at creation.
    Annotating records of other loggers too is harmless and lets one format string
    with ``%(correlation_id)s`` serve all handlers.
    """
    global _installed_factory, _previous_factory
    logger = logging.getLogger(logger_name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    if _installed_factory is not None and logging.getLogRecordFactory() is _installed_factory:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _annotate(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed_factory = factory
    _previous_factory = previous


def uninstall_log_correlation(logger_name: str = "rpcmesh") -> None:
    """Remove what ``install_log_correlation`` added (tests, embedding applications)."""
    global _installed_factory, _previous_factory
    logging.getLogger(logger_name).removeFilter(_FILTER)
    if _previous_factory is not None and logging.getLogRecordFactory() is _installed_factory:
        logging.setLogRecordFactory(_previous_factory)
    _installed_factory = None
    _previous_factory = None
