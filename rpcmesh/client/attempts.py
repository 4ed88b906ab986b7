"""The per-call decision core: where each attempt goes, and whether to retry or hedge. Pure.

A shell (asyncio or sync) runs a call as::

    controller = CallController(core, method, policy, deadline)
    controller.start()                          # service breaker; may raise NoEndpointError
    while True:
        endpoint = controller.begin_attempt()   # pick; may raise NoEndpointError
        outcome = <run the attempt on endpoint's sub-channel>
        delay = controller.end_attempt(endpoint, outcome)
        if delay is None: break                 # done: return or raise the last outcome
        <sleep delay>
    controller.finish(final_code)

Retry rules (gRFC A6 plus rpcmesh's idempotency rule), in order: success or a
code outside ``retryable_codes`` ends the call; a committed call (a response
already reached the caller, or the request stream outgrew its replay buffer)
is never retried; a method not marked idempotent is retried only when the
attempt provably never reached a server; then attempts are capped by
``max_attempts``, the server's ``grpc-retry-pushback-ms`` is obeyed (a negative
value forbids retrying), the retry budget must allow it, and the delay must
end before the call's deadline.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from rpcmesh.client.backoff import retry_delay
from rpcmesh.client.endpoints import ServiceCore
from rpcmesh.client.picker import EndpointState
from rpcmesh.client.policy import MethodPolicy

__all__ = [
    "ATTEMPT_KEY",
    "PUSHBACK_KEY",
    "AttemptOutcome",
    "CallController",
    "attempt_reached_server",
    "parse_pushback",
]

ATTEMPT_KEY = "rpcmesh-attempt"
"""Metadata key carrying the attempt number on retries and hedges (2, 3, ...); absent on the first."""

PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""Trailing metadata a server sends to delay (or, when negative, forbid) retries."""

# What grpc-core says when the transport could not be set up: the request
# never left this process.
_NOT_SENT_MARKERS = (
    "failed to connect to all addresses",
    "connection refused",
    "connect failed",
    "no route to host",
    "dns resolution failed",
    "channel is closed",
)


def attempt_reached_server(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether a failed attempt may have reached a server (False only when provably not)."""
    if code is not grpc.StatusCode.UNAVAILABLE:
        return True
    text = (details or "").lower()
    return not any(marker in text for marker in _NOT_SENT_MARKERS)


def parse_pushback(trailing: object) -> int | None:
    """The ``grpc-retry-pushback-ms`` value from trailing metadata; -1 when present but invalid."""
    if not trailing:
        return None
    try:
        items = list(trailing)  # type: ignore[call-overload]
    except TypeError:
        return None
    for item in items:
        key, value = item
        if key == PUSHBACK_KEY:
            try:
                return int(value)
            except (TypeError, ValueError):
                return -1
    return None


@dataclass(frozen=True)
class AttemptOutcome:
    """How one attempt ended."""

    code: grpc.StatusCode
    """Final status (OK on success)."""

    details: str = ""
    """Status message."""

    reached_server: bool = True
    """False only when the attempt provably never reached a server."""

    pushback_ms: int | None = None
    """Server pushback, when sent."""

    committed: bool = False
    """A response reached the caller, or the request could not be replayed."""

    duration: float = 0.0
    """Seconds the attempt took."""


class CallController:
    """Decisions for one logical call. Not shared between calls."""

    def __init__(
        self,
        core: ServiceCore,
        method: str,
        policy: MethodPolicy,
        deadline: float | None,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.core = core
        self.method = method
        self.policy = policy
        self.deadline = deadline
        self.attempts = 0
        self.tried: list[str] = []
        self._rand = rand
        self._started_at = core.clock()
        self._admitted = False
        self._outcomes = 0

    def start(self) -> None:
        """Admit the call through the service breaker (raises NoEndpointError when open)."""
        self.core.admit_call()
        self._admitted = True

    def remaining(self) -> float | None:
        """Seconds left before the call's deadline, or None."""
        return None if self.deadline is None else self.deadline - self.core.clock()

    def begin_attempt(self) -> EndpointState:
        """Pick the endpoint of the next attempt (another instance than before when there is one)."""
        endpoint = self.core.pick(self.tried)
        self.attempts += 1
        self.tried.append(endpoint.instance_id)
        return endpoint

    def _record(self, endpoint: EndpointState, outcome: AttemptOutcome) -> None:
        self._outcomes += 1
        with self.core.lock:
            endpoint.outstanding -= 1
        if endpoint.breaker is not None:
            failed = outcome.code in endpoint.breaker.policy.failure_codes
            endpoint.breaker.record(failed=failed, duration=outcome.duration)
        if outcome.code is grpc.StatusCode.OK:
            endpoint.connection_failed = False

    def end_attempt(self, endpoint: EndpointState, outcome: AttemptOutcome) -> float | None:
        """Record an attempt's outcome; return the delay before the next attempt, or None to stop."""
        self._record(endpoint, outcome)
        retry = self.policy.retry
        if outcome.code is grpc.StatusCode.OK:
            self.core.budget.on_success()
            return None
        retryable = retry is not None and outcome.code in retry.retryable_codes
        never_sent = not outcome.reached_server
        if never_sent:
            endpoint.connection_failed = True
        if retryable or never_sent:
            self.core.budget.on_failure()
        else:
            self.core.budget.on_success()
        if retry is None or outcome.committed:
            return None
        if not retryable and not never_sent:
            return None
        if not self.policy.idempotent and outcome.reached_server:
            return None
        if self.attempts >= retry.max_attempts:
            return None
        if outcome.pushback_ms is not None and outcome.pushback_ms < 0:
            return None
        if not self.core.budget.allow_retry():
            return None
        if outcome.pushback_ms is not None:
            delay = outcome.pushback_ms / 1000
        else:
            delay = retry_delay(
                self.attempts,
                initial=retry.initial_backoff,
                maximum=retry.max_backoff,
                multiplier=retry.backoff_multiplier,
                rand=self._rand,
            )
        remaining = self.remaining()
        if remaining is not None and delay >= remaining:
            return None
        return delay

    def end_hedge(self, endpoint: EndpointState, outcome: AttemptOutcome) -> bool:
        """Record a hedged attempt's outcome; True when the failure is non-fatal (the call goes on)."""
        self._record(endpoint, outcome)
        hedging = self.policy.hedging
        if outcome.code is grpc.StatusCode.OK:
            self.core.budget.on_success()
            return False
        non_fatal = hedging is not None and (
            outcome.code in hedging.non_fatal_codes or not outcome.reached_server
        )
        if non_fatal:
            self.core.budget.on_failure()
            if not outcome.reached_server:
                endpoint.connection_failed = True
        else:
            self.core.budget.on_success()
        if outcome.pushback_ms is not None and outcome.pushback_ms < 0:
            return False
        return non_fatal

    def may_hedge_soon(self) -> bool:
        """Whether the policy leaves room for another hedged attempt (budget not consulted)."""
        return self.policy.hedging is not None and self.attempts < self.policy.hedging.max_attempts

    def may_hedge(self) -> bool:
        """Whether one more hedged attempt may start now."""
        if self.policy.hedging is None or self.attempts >= self.policy.hedging.max_attempts:
            return False
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            return False
        return self.core.budget.allow_retry()

    def abandon_attempt(self, endpoint: EndpointState) -> None:
        """An attempt was cancelled (the caller gave up, or another hedge won): no outcome counted."""
        with self.core.lock:
            endpoint.outstanding -= 1

    def finish(self, code: grpc.StatusCode) -> None:
        """Record the call's final outcome in the service breaker.

        A call that reached no instance (every one refused by its own breaker, or none
        known) is not the service's failure: counting it would keep the service breaker
        open on its own fast-fails after the instances recovered, so its permit is
        given back instead.
        """
        breaker = self.core.breaker
        if breaker is not None and self._admitted and self._outcomes == 0:
            breaker.release()
        elif breaker is not None and self._admitted:
            failed = code in breaker.policy.failure_codes
            breaker.record(failed=failed, duration=self.core.clock() - self._started_at)
