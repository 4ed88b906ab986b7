"""How the coordinator calls participants: the StepInvoker protocol and its rpcmesh-client implementation.

Calls are generic, byte-level unary gRPC calls: the coordinator sends the
bytes its PayloadTemplate built and keeps the bytes it gets back, so a
participant is an ordinary gRPC method in any language.

:class:`MeshStepInvoker` makes every step and compensation call through
:class:`rpcmesh.client.Mesh`: discovery (a Registry watch per service, no
lookup per call), load balancing, circuit breakers and the client's retry
layer all apply. The default policy (:func:`coordinator_policy`) ejects
instances that hang or break; any :class:`~rpcmesh.client.MeshPolicy` can be
given instead, as long as it passes :func:`check_coordinator_policy`.

Who retries what:

* **The mesh** retries only attempts that provably never reached a
  participant (the connection could not be set up), on another instance when
  there is one, within the step's deadline. Every method is treated as
  non-idempotent and hedging is refused (:func:`check_coordinator_policy`), so
  the mesh never sends a request twice once it may have reached a server.
* **The saga's RetryPolicy** retries everything else: a failure that may have
  reached the participant counts as one attempt against ``max_attempts``,
  codes in ``non_retryable_codes`` end the step at once, and the backoff
  between attempts is the definition's. Each such attempt is recorded
  (StepStarted before the call, its outcome after) and carries the same
  ``x-idempotency-key``.
* A call that never reached any participant (no instance registered, every
  instance ejected by a breaker, the service breaker open, connection refused
  on every mesh attempt) raises :class:`StepCallError` with ``sent=False``. The
  saga records it and retries with the definition's backoff, but it does not
  use up one of ``max_attempts`` (an open breaker must delay a saga, not fail
  it); such unsent attempts are capped separately (see
  :data:`~rpcmesh.controlplane.saga.machine.MAX_UNSENT_ATTEMPTS`).

Whether a failed call was sent is known structurally: the coordinator policy
(:func:`check_coordinator_policy`) lets the mesh make another attempt only after
one that provably never reached a server, so every attempt before the last was
unsent, and the error raised is either the mesh's own (a
:class:`~rpcmesh.client._shell.MeshRpcError`: the next attempt was never made,
e.g. no instance or the deadline spent) or the last attempt's, which was sent
unless its status says the connection could not be set up
(:func:`rpcmesh.client.attempts.attempt_reached_server`). No per-attempt
interceptor is needed for that; the step call is a plain mesh call.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio

from rpcmesh.client._shell import MeshRpcError
from rpcmesh.client.attempts import attempt_reached_server
from rpcmesh.client.mesh import Mesh
from rpcmesh.client.policy import (
    BreakerPolicy,
    MeshPolicy,
    MethodPolicy,
    PolicyError,
    RetryPolicy,
    ServicePolicy,
)
from rpcmesh.security.client import ClientSecurity
from rpcmesh.telemetry import Telemetry, get_telemetry

__all__ = [
    "COORDINATOR_BREAKER_CODES",
    "CORRELATION_ID_KEY",
    "IDEMPOTENCY_KEY",
    "SAGA_ID_KEY",
    "SAGA_PHASE_KEY",
    "SAGA_STEP_KEY",
    "STARTED_BY_KEY",
    "TRACE_KEYS",
    "MeshStepInvoker",
    "StepCallError",
    "StepInvoker",
    "check_coordinator_policy",
    "coordinator_policy",
]

# Metadata every step and compensation call carries.
SAGA_ID_KEY = "x-saga-id"
SAGA_STEP_KEY = "x-saga-step"
SAGA_PHASE_KEY = "x-saga-phase"
IDEMPOTENCY_KEY = "x-idempotency-key"
CORRELATION_ID_KEY = "x-correlation-id"
STARTED_BY_KEY = "x-rpcmesh-saga-started-by"
"""The identity that started the saga, set by the coordinator from the starter's authenticated identity.

Trust it only on calls authenticated as the coordinator: any other caller can send any header."""
TRACE_KEYS = ("traceparent", "tracestate", "baggage")


class StepCallError(Exception):
    """A participant call failed with a gRPC status.

    Attributes:
        code: The status code as an integer (google.rpc.Code).
        message: The status message.
        sent: False only when the call provably never reached a participant.
    """

    def __init__(self, code: int, message: str, *, sent: bool = True) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.sent = sent


class StepInvoker(Protocol):
    """Calls one method of a service by its Registry name, with raw bytes.

    The engine calls :meth:`invoke` with the step's span and the saga's correlation id
    current. An invoker whose calls write trace headers from the current context
    themselves (a traced mesh) says so with a true ``injects_trace_context`` attribute;
    for others, with tracing on, the engine puts the step span's headers in ``metadata``.
    """

    async def invoke(
        self,
        service: str,
        method: str,
        request: bytes,
        *,
        deadline: float,
        metadata: Sequence[tuple[str, str]],
    ) -> bytes:
        """The response bytes; raises StepCallError with the status code on failure."""
        ...

    async def close(self) -> None:
        """Release channels."""
        ...


# What ejects a participant instance: it hangs or breaks. UNAVAILABLE answers are
# left to the saga's RetryPolicy (a participant may answer "try again" on purpose)
# and connection failures to the mesh's connection tracking and unsent retries.
COORDINATOR_BREAKER_CODES = frozenset(
    {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)


def coordinator_policy() -> MeshPolicy:
    """The coordinator's default mesh policy.

    Methods are non-idempotent, so the client's retry policy only re-sends
    attempts that never reached a server. Each instance has a breaker that
    opens on DEADLINE_EXCEEDED, INTERNAL and UNKNOWN and ejects the instance;
    there is no service-wide breaker: calls it rejects would count as its own
    failures and keep it open, and sagas already wait out unsent attempts.
    """
    return MeshPolicy(
        default=ServicePolicy(
            method=MethodPolicy(idempotent=False, retry=RetryPolicy(max_attempts=3)),
            instance_breaker=BreakerPolicy(failure_codes=COORDINATOR_BREAKER_CODES),
            service_breaker=None,
        )
    )


def _check_method(field: str, policy: MethodPolicy) -> None:
    if policy.idempotent or policy.hedging is not None:
        raise PolicyError(
            f"{field}: saga calls must not be idempotent or hedged at the mesh layer "
            "(the saga's RetryPolicy retries calls that reached a participant)"
        )


def check_coordinator_policy(policy: MeshPolicy) -> None:
    """Refuse a policy that would let the mesh re-send a call that may have reached a participant.

    Raises:
        PolicyError: naming the offending field.
    """
    services = {"default": policy.default, **{f"services[{k}]": v for k, v in policy.services.items()}}
    for name, service in services.items():
        _check_method(f"{name}.method", service.method)
        for method, method_policy in service.methods.items():
            _check_method(f"{name}.methods[{method}]", method_policy)


_RESTORE: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "saga_restore_headers", default=()
)


class _TraceHeaderRestorer(grpc.aio.UnaryUnaryClientInterceptor):
    """Puts the saga's stored trace headers back on each attempt of the current step call.

    Needed only when telemetry is active with tracing off: the mesh's tracing
    interceptors then rewrite the propagation keys but have no span to write.
    """

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        restore = _RESTORE.get()
        if restore:
            client_call_details = _with_headers(client_call_details, restore)
        return await continuation(client_call_details, request)


def call_was_sent(error: grpc.aio.AioRpcError) -> bool:
    """Whether a failed mesh call under the coordinator policy may have reached a participant."""
    if isinstance(error, MeshRpcError):
        return False  # raised before its attempt; earlier attempts (if any) were provably unsent
    return attempt_reached_server(error.code(), error.details())


def _with_headers(
    details: grpc.aio.ClientCallDetails, headers: Sequence[tuple[str, str]]
) -> grpc.aio.ClientCallDetails:
    """``details`` plus those of ``headers`` whose keys its metadata lacks."""
    items = list(details.metadata or ())
    present = {key for key, _ in items}
    missing = [(key, value) for key, value in headers if key not in present]
    if not missing:
        return details
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=grpc.aio.Metadata(*items, *missing),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class MeshStepInvoker:
    """Step and compensation calls through :class:`rpcmesh.client.Mesh`.

    With tracing on, the mesh writes ``traceparent``/``baggage``/``x-correlation-id`` for
    each attempt from the current context (the engine makes the step's span current), so
    callers leave them out of ``metadata`` (:attr:`injects_trace_context`). With tracing
    off they pass the saga's stored headers, which are sent as given.

    Args:
        registry: Registry address(es) the mesh discovers participants from.
        policy: Mesh policy (default :func:`coordinator_policy`); refused when
            it marks a method idempotent or hedged.
        channel_options: gRPC options of every sub-channel.
        security: How the mesh reaches the Registry and participants. The
            coordinator passes the control plane's own client security; None
            keeps the Mesh default (``ClientSecurity.from_env()``).
        telemetry: The mesh's telemetry handle; None follows ``get_telemetry()``.
            When telemetry is off as the invoker is made, step calls are plain mesh
            calls with no client interceptor at all (telemetry switched on later gets
            tracing, but the saga's stored headers are then not restored on the
            metrics-only path).
    """

    injects_trace_context = True
    """Step calls get trace headers from the current context (see the class docstring)."""

    def __init__(
        self,
        registry: str | Sequence[str],
        *,
        policy: MeshPolicy | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        security: ClientSecurity | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        policy = policy or coordinator_policy()
        check_coordinator_policy(policy)
        self._telemetry = telemetry
        self._restores = (telemetry or get_telemetry()).active
        self.mesh = Mesh(
            registry,
            policy=policy,
            channel_options=channel_options,
            interceptors=[_TraceHeaderRestorer()] if self._restores else [],
            security=security,
            telemetry=telemetry,
        )
        self._callables: dict[tuple[str, str], Any] = {}

    def _callable(self, service: str, method: str) -> Any:
        # One multicallable per (service, method): the mesh caches per-instance state on it.
        found = self._callables.get((service, method))
        if found is None:
            found = self.mesh.channel(service).unary_unary(method)
            self._callables[(service, method)] = found
        return found

    async def invoke(
        self,
        service: str,
        method: str,
        request: bytes,
        *,
        deadline: float,
        metadata: Sequence[tuple[str, str]],
    ) -> bytes:
        """Call ``method`` on an instance of ``service``; raises StepCallError."""
        token = None
        if self._restores:
            telemetry = self._telemetry or get_telemetry()
            if telemetry.active and not telemetry.tracing:
                token = _RESTORE.set(tuple((key, value) for key, value in metadata if key in TRACE_KEYS))
        try:
            response: bytes = await self._callable(service, method)(
                request, timeout=deadline, metadata=tuple(metadata)
            )
        except grpc.aio.AioRpcError as exc:
            raise StepCallError(exc.code().value[0], exc.details() or "", sent=call_was_sent(exc)) from exc
        finally:
            if token is not None:
                _RESTORE.reset(token)
        return response

    async def close(self) -> None:
        """Stop the mesh's watches and close its sub-channels."""
        self._callables.clear()
        await self.mesh.close()
