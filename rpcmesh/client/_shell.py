"""Helpers shared by the asyncio and sync shells: metadata, errors and outcomes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from rpcmesh.client.attempts import (
    ATTEMPT_KEY,
    AttemptOutcome,
    CallController,
    attempt_reached_server,
    parse_pushback,
)
from rpcmesh.client.context import REQUEST_ID_KEY, current_call
from rpcmesh.client.picker import EndpointState, NoEndpointError
from rpcmesh.telemetry.correlation import CORRELATION_METADATA_KEY, correlation_id

if TYPE_CHECKING:
    from rpcmesh.client._telemetry import CallTelemetry

__all__ = [
    "MeshRpcError",
    "attempt_metadata",
    "begin_attempt",
    "end_attempt",
    "finish_call",
    "mesh_error",
    "outcome_of",
    "start_call",
]

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
        # Telemetry off: the correlation id still travels (the attempt tracing, when on,
        # replaces this entry with its own).
        items.append((CORRELATION_METADATA_KEY, correlation))
    return tuple(items)


class MeshRpcError(grpc.aio.AioRpcError):
    """An RpcError the mesh raised itself before sending an attempt (no instance, open breaker, deadline)."""


def mesh_error(code: grpc.StatusCode, message: str) -> grpc.aio.AioRpcError:
    """An RpcError raised by the mesh itself (no instance, open breaker, deadline spent): a MeshRpcError."""
    return MeshRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=message)


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


def start_call(controller: CallController, telemetry: CallTelemetry | None) -> CallController:
    """Admit the call through the service breaker; a refusal becomes UNAVAILABLE naming the breaker."""
    try:
        controller.start()
    except NoEndpointError as exc:
        if telemetry is not None:
            telemetry.rejected(exc)
        raise mesh_error(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
    return controller


def begin_attempt(controller: CallController, telemetry: CallTelemetry | None) -> EndpointState:
    """Pick the next attempt's instance; a spent deadline or no admissible instance ends the call."""
    remaining = controller.remaining()
    if remaining is not None and remaining <= 0:
        finish_call(controller, grpc.StatusCode.DEADLINE_EXCEEDED, telemetry)
        raise mesh_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call could be sent")
    try:
        return controller.begin_attempt()
    except NoEndpointError as exc:
        finish_call(controller, grpc.StatusCode.UNAVAILABLE, telemetry)
        if telemetry is not None:
            telemetry.rejected(exc)
        raise mesh_error(grpc.StatusCode.UNAVAILABLE, str(exc)) from None


def finish_call(controller: CallController, code: grpc.StatusCode, telemetry: CallTelemetry | None) -> None:
    """``controller.finish`` with the call's span current (service-breaker transitions become its events)."""
    if telemetry is None:
        controller.finish(code)
        return
    with telemetry.scope():
        controller.finish(code)


def end_attempt(
    controller: CallController,
    endpoint: EndpointState,
    outcome: AttemptOutcome,
    telemetry: CallTelemetry | None,
) -> float | None:
    """``controller.end_attempt``, with the call's span current (breaker transitions become its events)."""
    if telemetry is None:
        return controller.end_attempt(endpoint, outcome)
    with telemetry.scope():
        return controller.end_attempt(endpoint, outcome)
