"""Helpers shared by the asyncio and sync shells: metadata, errors and outcomes."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio

from rpcmesh.client.attempts import ATTEMPT_KEY, AttemptOutcome, attempt_reached_server, parse_pushback
from rpcmesh.client.context import REQUEST_ID_KEY, current_call
from rpcmesh.telemetry.correlation import CORRELATION_METADATA_KEY, correlation_id

__all__ = ["attempt_metadata", "mesh_error", "outcome_of"]

MetadataLike = Any


def attempt_metadata(metadata: MetadataLike, attempt: int) -> tuple[tuple[str, str | bytes], ...] | None:
    """A copy of the caller's metadata plus the attempt number, the request id and the correlation id.

    Like gRFC A6's ``grpc-previous-rpc-attempts``, the attempt number is only
    sent on retries and hedges (attempt >= 2): no header means the first attempt.
    """
    incoming = current_call.get()
    correlation = correlation_id()
    if (
        metadata is None
        and attempt == 1
        and correlation is None
        and (incoming is None or not incoming.request_id)
    ):
        return None  # the common case: nothing to send
    items: list[tuple[str, str | bytes]] = [] if metadata is None else [(k, v) for k, v in metadata]
    if attempt > 1:
        items.append((ATTEMPT_KEY, str(attempt)))
    if incoming is not None and incoming.request_id and all(k != REQUEST_ID_KEY for k, _ in items):
        items.append((REQUEST_ID_KEY, incoming.request_id))
    if correlation is not None and all(k != CORRELATION_METADATA_KEY for k, _ in items):
        # Telemetry off: the correlation id still travels (the tracing interceptors, when on,
        # replace this entry with their own).
        items.append((CORRELATION_METADATA_KEY, correlation))
    return tuple(items)


def mesh_error(code: grpc.StatusCode, message: str) -> grpc.aio.AioRpcError:
    """An RpcError raised by the mesh itself (no instance, open breaker, deadline spent)."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=message)


def outcome_of(error: grpc.RpcError, duration: float, *, committed: bool = False) -> AttemptOutcome:
    """The attempt outcome a failed call reports."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    try:
        trailing = error.trailing_metadata()
    except Exception:  # a sync error may not carry metadata
        trailing = None
    return AttemptOutcome(
        code=code,
        details=details,
        reached_server=attempt_reached_server(code, details),
        pushback_ms=parse_pushback(trailing),
        committed=committed,
        duration=duration,
    )
