"""Helpers shared by the asyncio and sync shells: metadata, errors and outcomes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
import grpc.aio

from rpcmesh.client.attempts import (
    ATTEMPT_KEY,
    Attempt,
    AttemptOutcome,
    CallController,
    attempt_reached_server,
    parse_pushback,
)
from rpcmesh.client.context import REQUEST_ID_KEY, current_call
from rpcmesh.client.picker import NoEndpointError
from rpcmesh.errors import RpcStatusError, rpc_status_error_class
from rpcmesh.telemetry.correlation import CORRELATION_METADATA_KEY, correlation_id

if TYPE_CHECKING:
    from rpcmesh.client._telemetry import CallTelemetry

__all__ = [
    "MeshRpcError",
    "attempt_metadata",
    "begin_attempt",
    "end_attempt",
    "end_hedge",
    "finish_call",
    "mesh_error",
    "outcome_of",
    "send_attempt",
    "start_call",
    "try_hedge",
]

MetadataLike = Any
T = TypeVar("T")


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
    """An RpcError the mesh raised itself before sending an attempt (no instance, open breaker, deadline).

    Every one is also the :class:`~rpcmesh.errors.RpcStatusError` subclass for its code
    (``UnavailableError``, ``DeadlineExceededError``), as :func:`mesh_error` makes them.
    """


_MESH_ERRORS: dict[grpc.StatusCode, type[RpcStatusError]] = {}


def _mesh_error_class(code: grpc.StatusCode) -> type[RpcStatusError]:
    found = _MESH_ERRORS.get(code)
    if found is None:
        base = rpc_status_error_class(code)
        name = "Mesh" + base.__name__
        found = cast(type[RpcStatusError], type(name, (base, MeshRpcError), {"__module__": __name__}))
        globals()[name] = found  # importable by name, so the errors pickle
        _MESH_ERRORS[code] = found
    return found


def mesh_error(code: grpc.StatusCode, message: str) -> RpcStatusError:
    """An RpcError raised by the mesh itself (no instance, open breaker, deadline spent).

    It is a MeshRpcError and the RpcStatusError subclass for ``code``.
    """
    return _mesh_error_class(code)(code, message)


def _metadata(error: grpc.RpcError, which: str) -> Any:
    try:
        return getattr(error, which)()
    except Exception:  # an error raised before any call (e.g. by an interceptor) may carry none
        return None


def outcome_of(error: grpc.RpcError, duration: float, *, committed: bool = False) -> AttemptOutcome:
    """The attempt outcome a failed call reports.

    The attempt is committed (gRFC A6: never retried) when ``committed`` says so or the
    server sent response headers before failing. grpc's Python API shows received headers
    only through their entries, so a server that sends an empty header block before failing
    is indistinguishable from a trailers-only failure and may still be retried; and grpc.aio
    may settle a streaming call's status before headers that arrived just ahead of it (a
    server failing within microseconds of its headers), which then look absent too.
    """
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    return AttemptOutcome(
        code=code,
        details=details,
        reached_server=attempt_reached_server(code, details),
        pushback_ms=parse_pushback(_metadata(error, "trailing_metadata")),
        committed=committed or bool(_metadata(error, "initial_metadata")),
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


def begin_attempt(controller: CallController, telemetry: CallTelemetry | None) -> Attempt:
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
    attempt: Attempt,
    outcome: AttemptOutcome,
    telemetry: CallTelemetry | None,
) -> float | None:
    """``controller.end_attempt``, with the call's span current (breaker transitions become its events)."""
    if telemetry is None:
        return controller.end_attempt(attempt, outcome)
    with telemetry.scope():
        return controller.end_attempt(attempt, outcome)


def end_hedge(
    controller: CallController,
    attempt: Attempt,
    outcome: AttemptOutcome,
    telemetry: CallTelemetry | None,
) -> bool:
    """``controller.end_hedge``, with the call's span current."""
    if telemetry is None:
        return controller.end_hedge(attempt, outcome)
    with telemetry.scope():
        return controller.end_hedge(attempt, outcome)


def try_hedge(controller: CallController, launch: Callable[[], None]) -> bool:
    """Start the next hedged attempt with ``launch`` if one is due; False when none started."""
    if not controller.may_hedge():
        return False
    try:
        launch()
    except grpc.RpcError:
        return False  # no instance for another hedge: the running attempts carry on
    return True


def send_attempt(
    attempt: Attempt,
    telemetry: CallTelemetry | None,
    send: Callable[..., T],
    request: Any,
    options: dict[str, Any],
    *,
    hedge: bool = False,
    backoff_s: float | None = None,
    reason: str | None = None,
) -> T:
    """Start the attempt (``send(request, **options)`` on its sub-channel), traced as the call's attempt."""
    if telemetry is None:
        return send(request, **options)
    with telemetry.scope():
        telemetry.attempt(
            attempt.number, attempt.endpoint.address, hedge=hedge, backoff_s=backoff_s, reason=reason
        )
        return send(request, **options)
