"""The per-call decision core: where each attempt goes, and whether to retry or hedge. Pure.

A shell (asyncio or sync) runs a call as::

    controller = CallController(core, method, policy, deadline)
    controller.start()                            # service breaker; may raise NoEndpointError
    try:
        while True:
            attempt = controller.begin_attempt()  # pick + instance breaker permit
            outcome = <run the attempt on attempt.endpoint's sub-channel>
            delay = controller.end_attempt(attempt, outcome)
            if delay is None: break               # done: return or raise the last outcome
            <sleep delay>
        controller.finish(final_code)
    finally:
        controller.release()                      # every exit path: cancel, error, lost hedge

Permits: the call holds the service breaker's permit, each attempt its
instance breaker's permit and an ``outstanding`` slot. ``end_attempt`` /
``end_hedge`` record an attempt's outcome, ``abandon_attempt`` gives its permit
back without one (cancelled, a lost hedge), ``finish`` records the call's, and
``release`` gives back whatever is still held, so no exit path can leave a
breaker half-open with its probes taken.

Retry rules (gRFC A6 plus rpcmesh's idempotency rule), in order: success or a
code outside ``retryable_codes`` ends the call (and leaves the retry budget
alone); a committed call (response headers or a response already arrived, or
the request stream outgrew its replay buffer) is never retried; a method not
marked idempotent is retried only when the attempt provably never reached a
server; then attempts are capped by ``max_attempts`` (an attempt that provably
never left the client is a transparent retry, made even without a retry policy,
and does not count, up to ``MAX_TRANSPARENT_RETRIES``), the server's ``grpc-retry-pushback-ms`` is obeyed
(a negative value forbids retrying), the retry budget must allow it, and the
delay must end before the call's deadline. Hedging obeys pushback too: a
positive value delays the next hedge, a negative one stops hedging.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from rpcmesh.client.backoff import retry_delay
from rpcmesh.client.breaker import BreakerPermit
from rpcmesh.client.endpoints import ServiceCore
from rpcmesh.client.picker import EndpointState
from rpcmesh.client.policy import MethodPolicy, RetryPolicy

__all__ = [
    "ATTEMPT_KEY",
    "MAX_TRANSPARENT_RETRIES",
    "PUSHBACK_KEY",
    "Attempt",
    "AttemptOutcome",
    "CallController",
    "attempt_reached_server",
    "parse_pushback",
]

ATTEMPT_KEY = "rpcmesh-attempt"
"""Metadata key carrying the attempt number on retries and hedges (2, 3, ...); absent on the first."""

PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""Trailing metadata a server sends to delay (or, when negative, forbid) retries."""

MAX_TRANSPARENT_RETRIES = 5
"""Attempts per call that never left the client and are retried without counting against
``max_attempts``, with or without a retry policy (gRFC A6 transparent retries; bounded so a
dead service cannot spin)."""

_TRANSPARENT_BACKOFF = RetryPolicy()
"""The backoff of transparent retries of a method without a retry policy."""

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
    """Response headers or a response arrived, or the request could not be replayed."""

    duration: float = 0.0
    """Seconds the attempt took."""


@dataclass(eq=False)
class Attempt:
    """One attempt of a call and what it holds until it ends."""

    endpoint: EndpointState
    """The instance it went to."""

    number: int
    """1 for the first attempt, then 2, 3, ... (retries and hedges)."""

    permit: BreakerPermit | None
    """The instance breaker's permit (None without a breaker, or when panic-routed past it)."""

    ended: bool = False
    """Its outcome was recorded or it was abandoned; its slot and permit are back."""


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
        self._permit: BreakerPermit | None = None
        self._outcomes = 0
        self._transparent = 0
        self._live: list[Attempt] = []
        self._hedge_at = 0.0
        self._hedging_stopped = False

    def start(self) -> None:
        """Admit the call through the service breaker (raises NoEndpointError when open)."""
        self._permit = self.core.admit(self.remaining())

    def remaining(self) -> float | None:
        """Seconds left before the call's deadline, or None."""
        return None if self.deadline is None else self.deadline - self.core.clock()

    def begin_attempt(self) -> Attempt:
        """Pick the endpoint of the next attempt (another instance than before when there is one).

        Takes the instance breaker's permit, held at most until the call's deadline.
        """
        endpoint = self.core.pick(self.tried)
        self.attempts += 1
        self.tried.append(endpoint.instance_id)
        permit = endpoint.breaker.take(self.remaining()) if endpoint.breaker is not None else None
        attempt = Attempt(endpoint, self.attempts, permit)
        self._live.append(attempt)
        if self.policy.hedging is not None:
            self._hedge_at = self.core.clock() + self.policy.hedging.delay
        return attempt

    def _settle(self, attempt: Attempt, outcome: AttemptOutcome | None) -> bool:
        """Give back what an attempt holds, recording its outcome (None: abandoned); once only."""
        if attempt.ended:
            return False
        attempt.ended = True
        self._live.remove(attempt)
        endpoint = attempt.endpoint
        with self.core.lock:
            endpoint.outstanding -= 1
        permit = attempt.permit
        if outcome is None:
            if permit is not None:
                permit.release()
            return True
        self._outcomes += 1
        if permit is not None:
            failed = outcome.code in permit.breaker.policy.failure_codes
            permit.record(failed=failed, duration=outcome.duration)
        if outcome.code is grpc.StatusCode.OK:
            endpoint.connection_failed = False
        elif not outcome.reached_server:
            endpoint.connection_failed = True
        return True

    def end_attempt(self, attempt: Attempt, outcome: AttemptOutcome) -> float | None:
        """Record an attempt's outcome; return the delay before the next attempt, or None to stop."""
        if not self._settle(attempt, outcome):
            return None
        retry = self.policy.retry
        if outcome.code is grpc.StatusCode.OK:
            self.core.budget.on_success()
            return None
        retryable = retry is not None and outcome.code in retry.retryable_codes
        never_sent = not outcome.reached_server
        if not retryable and not never_sent:
            return None  # gRFC A6: a non-retryable failure neither takes nor gives tokens
        self.core.budget.on_failure()
        if outcome.committed:
            return None
        if not self.policy.idempotent and not never_sent:
            return None
        transparent = never_sent and self._transparent < MAX_TRANSPARENT_RETRIES
        counted = self.attempts - self._transparent - (1 if transparent else 0)
        if retry is None:
            if not transparent:
                return None
            retry = _TRANSPARENT_BACKOFF  # transparent retries need no retry policy (gRFC A6)
        elif counted >= retry.max_attempts:
            return None
        if outcome.pushback_ms is not None and outcome.pushback_ms < 0:
            return None
        if not self.core.budget.allow_retry():
            return None
        if outcome.pushback_ms is not None:
            delay = outcome.pushback_ms / 1000
        else:
            delay = retry_delay(
                max(1, counted),
                initial=retry.initial_backoff,
                maximum=retry.max_backoff,
                multiplier=retry.backoff_multiplier,
                rand=self._rand,
            )
        remaining = self.remaining()
        if remaining is not None and delay >= remaining:
            return None
        if transparent:
            self._transparent += 1
        return delay

    def end_hedge(self, attempt: Attempt, outcome: AttemptOutcome) -> bool:
        """Record a hedged attempt's outcome; True when the failure is non-fatal (the call goes on).

        A committed failure is fatal. Pushback is obeyed: a positive value delays the next
        hedge by that much, a negative (or invalid) one stops hedging while the attempts
        already running carry on.
        """
        if not self._settle(attempt, outcome):
            return True
        hedging = self.policy.hedging
        if outcome.code is grpc.StatusCode.OK:
            self.core.budget.on_success()
            return False
        non_fatal = hedging is not None and (
            outcome.code in hedging.non_fatal_codes or not outcome.reached_server
        )
        if not non_fatal:
            return False
        self.core.budget.on_failure()
        if outcome.committed:
            return False
        now = self.core.clock()
        if outcome.pushback_ms is not None and outcome.pushback_ms < 0:
            self._hedging_stopped = True
        elif outcome.pushback_ms is not None:
            self._hedge_at = now + outcome.pushback_ms / 1000
        else:
            self._hedge_at = now  # a non-fatal failure starts the next hedge at once
        return True

    def may_hedge_soon(self) -> bool:
        """Whether the policy leaves room for another hedged attempt (budget not consulted)."""
        hedging = self.policy.hedging
        return hedging is not None and not self._hedging_stopped and self.attempts < hedging.max_attempts

    def hedge_wait(self) -> float | None:
        """Seconds until another hedge is due (0: now); None when no more will start."""
        if not self.may_hedge_soon():
            return None
        wait = max(0.0, self._hedge_at - self.core.clock())
        remaining = self.remaining()
        if remaining is not None and wait >= remaining:
            return None
        return wait

    def may_hedge(self) -> bool:
        """Whether one more hedged attempt may start now (it is due, and the budget allows it).

        A due hedge refused (deadline spent, budget drained) stops hedging for the call.
        """
        if not self.may_hedge_soon() or self.core.clock() < self._hedge_at:
            return False
        remaining = self.remaining()
        if (remaining is not None and remaining <= 0) or not self.core.budget.allow_retry():
            self._hedging_stopped = True
            return False
        return True

    def abandon_attempt(self, attempt: Attempt) -> None:
        """An attempt was cancelled (the caller gave up, or another hedge won): no outcome counted."""
        self._settle(attempt, None)

    def finish(self, code: grpc.StatusCode) -> None:
        """Record the call's final outcome in the service breaker.

        A call that reached no instance (every one refused by its own breaker, or none
        known) is not the service's failure: counting it would keep the service breaker
        open on its own fast-fails after the instances recovered, so its permit is
        given back instead.
        """
        permit, self._permit = self._permit, None
        if permit is None:
            return
        if self._outcomes == 0:
            permit.release()
        else:
            permit.record(
                failed=code in permit.breaker.policy.failure_codes,
                duration=self.core.clock() - self._started_at,
            )

    def release(self) -> None:
        """Give back everything the call still holds; idempotent, for a ``finally``.

        Attempts still running are abandoned (their probe permits go back), and an
        unfinished call's service permit is released without an outcome: a caller that
        gave up says nothing about the service's health.
        """
        for attempt in list(self._live):
            self._settle(attempt, None)
        permit, self._permit = self._permit, None
        if permit is not None:
            permit.release()
