"""Circuit breaker state machine: closed, open, half-open. Pure; the clock is injected.

Closed: calls flow; outcomes go into a count-based sliding window. The breaker
opens on ``consecutive_failures`` failures in a row, or, once the window holds
``minimum_calls``, when the failure rate (or slow-call rate) reaches its
threshold. Open: nothing is admitted until ``open_duration`` has passed, then
it turns half-open and admits ``half_open_probes`` probe calls: if all succeed
it closes, the first failure opens it again.

Admissions are :class:`BreakerPermit` objects (:meth:`CircuitBreaker.take`),
resolved exactly once: ``record`` an outcome, or ``release`` a call that ended
without one (cancelled by its caller, a lost hedge). A half-open probe permit
that is never resolved expires at its hold time and is given back, so a
breaker cannot stay half-open with every probe held by calls that never report.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rpcmesh.client.policy import BreakerPolicy

__all__ = ["BreakerPermit", "BreakerSnapshot", "BreakerState", "CircuitBreaker", "TransitionListener"]


class BreakerState(enum.Enum):
    """The three states of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerSnapshot:
    """A breaker's state as the API reports it."""

    name: str
    """e.g. ``instance echo/echo-1`` or ``service echo``."""

    state: BreakerState
    """Current state."""

    failure_rate: float
    """Share of failed calls in the window (0 when empty)."""

    slow_call_rate: float
    """Share of slow calls in the window (0 when empty)."""

    calls_in_window: int
    """Calls currently in the window."""

    consecutive_failures: int
    """Failures in a row."""

    reason: str
    """Why it last opened ('' when it never did)."""

    retry_in: float
    """Seconds until an open breaker turns half-open (0 otherwise)."""


TransitionListener = Callable[[str, str, str], None]
"""Called as ``listener(breaker_name, from_state, to_state)`` on every state change (states by value)."""


class BreakerPermit:
    """One admission by a :class:`CircuitBreaker`; resolve it with :meth:`record` or :meth:`release`.

    Resolving twice is harmless (the second is ignored), so a shell may release in a
    ``finally`` whatever an earlier branch already recorded.

    Attributes:
        probe: A half-open probe (it holds one of the policy's ``half_open_probes``).
        generation: The half-open period a probe belongs to.
        expires_at: When the breaker takes an unresolved probe permit back by itself.
        resolved: Recorded, released or expired.
    """

    __slots__ = ("breaker", "expires_at", "generation", "probe", "resolved")

    def __init__(self, breaker: CircuitBreaker, *, probe: bool, generation: int, expires_at: float) -> None:
        self.breaker = breaker
        self.probe = probe
        self.generation = generation
        self.expires_at = expires_at
        self.resolved = False

    def record(self, *, failed: bool, duration: float = 0.0) -> None:
        """Report the admitted call's outcome."""
        self.breaker.resolve(self, failed=failed, duration=duration)

    def release(self) -> None:
        """Give the permit back without an outcome (the call was cancelled or lost a hedge)."""
        self.breaker.resolve(self, failed=None)


class CircuitBreaker:
    """One circuit breaker; thread-safe so the sync and asyncio shells share it.

    ``on_transition`` (optional) hears every state change; it runs under the
    breaker's lock, so it must be quick and must not call back into the breaker.
    """

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_transition: TransitionListener | None = None,
    ) -> None:
        self.name = name
        self._on_transition = on_transition
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._window: deque[tuple[bool, bool]] = deque(maxlen=policy.window)
        self._failures_in_window = 0
        self._slow_in_window = 0
        self._consecutive = 0
        self._opened_at = 0.0
        self._probes_left = 0
        self._probe_successes = 0
        self._reason = ""
        self._generation = 0
        self._held: dict[BreakerPermit, float] = {}
        self.transitions: list[tuple[BreakerState, BreakerState]] = []

    def _advance(self, now: float) -> None:
        if self._state is BreakerState.OPEN and now - self._opened_at >= self.policy.open_duration:
            self._move(BreakerState.HALF_OPEN)
            self._generation += 1
            self._held.clear()
            self._probes_left = self.policy.half_open_probes
            self._probe_successes = 0
        if self._held and self._state is BreakerState.HALF_OPEN:
            # The backstop: a probe permit held past its time is given back.
            for permit, expires_at in list(self._held.items()):
                if expires_at <= now:
                    del self._held[permit]
                    permit.resolved = True
                    self._probes_left = min(self._probes_left + 1, self.policy.half_open_probes)

    def _move(self, state: BreakerState) -> None:
        self.transitions.append((self._state, state))
        if len(self.transitions) > 100:
            del self.transitions[:50]
        previous, self._state = self._state, state
        if self._on_transition is not None:
            self._on_transition(self.name, previous.value, state.value)

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker turns half-open once its wait is over)."""
        with self._lock:
            self._advance(self._clock())
            return self._state

    def admits(self) -> bool:
        """Whether a call would be admitted now, without taking a probe permit."""
        fast = self._state  # fast path: an attribute read needs no lock
        if fast is BreakerState.CLOSED:
            return True
        with self._lock:
            self._advance(self._clock())
            if self._state is BreakerState.CLOSED:
                return True
            return self._state is BreakerState.HALF_OPEN and self._probes_left > 0

    def acquire(self) -> bool:
        """Admit one call: always when closed, a probe permit when half-open, never when open."""
        fast = self._state
        if fast is BreakerState.CLOSED:
            return True
        with self._lock:
            self._advance(self._clock())
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.HALF_OPEN and self._probes_left > 0:
                self._probes_left -= 1
                return True
            return False

    def take(self, hold: float | None = None) -> BreakerPermit | None:
        """Admit one call as a permit (None when refused): always when closed, a probe when half-open.

        Args:
            hold: Seconds the call may hold a probe permit (its deadline), capped by the
                policy's ``max_probe_hold``; past it the breaker takes the permit back.
        """
        fast = self._state  # fast path: an attribute read needs no lock
        if fast is BreakerState.CLOSED:
            return BreakerPermit(self, probe=False, generation=self._generation, expires_at=0.0)
        with self._lock:
            now = self._clock()
            self._advance(now)
            if self._state is BreakerState.CLOSED:
                return BreakerPermit(self, probe=False, generation=self._generation, expires_at=0.0)
            if self._state is not BreakerState.HALF_OPEN or self._probes_left <= 0:
                return None
            self._probes_left -= 1
            limit = self.policy.max_probe_hold
            held_for = limit if hold is None else max(0.0, min(hold, limit))
            permit = BreakerPermit(self, probe=True, generation=self._generation, expires_at=now + held_for)
            self._held[permit] = permit.expires_at
            return permit

    def resolve(self, permit: BreakerPermit, *, failed: bool | None, duration: float = 0.0) -> None:
        """Record a permit's outcome (``failed`` a bool) or give it back (``failed`` None); once only.

        Only a probe of the current half-open period counts towards closing or reopening; a
        call admitted while closed counts in the window only if the breaker is still closed.
        """
        slow = self.policy.slow_call_duration is not None and duration >= self.policy.slow_call_duration
        with self._lock:
            if permit.resolved:
                return
            permit.resolved = True
            self._advance(self._clock())
            held = self._held.pop(permit, None) is not None
            current = held and self._state is BreakerState.HALF_OPEN
            if failed is None:
                if current:
                    self._probes_left = min(self._probes_left + 1, self.policy.half_open_probes)
            elif permit.probe:
                if current:
                    self._probe_outcome(failed, slow)
            elif self._state is BreakerState.CLOSED:
                self._closed_outcome(failed, slow)

    def record(self, *, failed: bool, duration: float = 0.0) -> None:
        """Record the outcome of a call admitted by :meth:`acquire` (when half-open: as a probe)."""
        slow = self.policy.slow_call_duration is not None and duration >= self.policy.slow_call_duration
        with self._lock:
            if self._state is not BreakerState.CLOSED:
                self._advance(self._clock())
            if self._state is BreakerState.OPEN:
                return
            if self._state is BreakerState.HALF_OPEN:
                self._probe_outcome(failed, slow)
                return
            self._closed_outcome(failed, slow)

    def _probe_outcome(self, failed: bool, slow: bool) -> None:
        if failed or slow:
            self._open("probe failed" if failed else "probe was slow")
            return
        self._probe_successes += 1
        if self._probe_successes >= self.policy.half_open_probes:
            self._close()

    def _closed_outcome(self, failed: bool, slow: bool) -> None:
        self._push(failed, slow)
        self._consecutive = self._consecutive + 1 if failed else 0
        limit = self.policy.consecutive_failures
        if limit and self._consecutive >= limit:
            self._open(f"{self._consecutive} consecutive failures")
            return
        calls = len(self._window)
        if calls >= self.policy.minimum_calls:
            rate = self._failures_in_window / calls
            if rate >= self.policy.failure_rate:
                self._open(f"failure rate {rate:.0%} over {calls} calls")
                return
            slow_rate = self._slow_in_window / calls
            if self.policy.slow_call_duration is not None and slow_rate >= self.policy.slow_call_rate:
                self._open(f"slow-call rate {slow_rate:.0%} over {calls} calls")

    def release(self) -> None:
        """Give back a probe permit taken by :meth:`acquire` for a call that never ran."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._probes_left = min(self._probes_left + 1, self.policy.half_open_probes)

    def _push(self, failed: bool, slow: bool) -> None:
        if len(self._window) == self._window.maxlen:
            old_failed, old_slow = self._window[0]
            self._failures_in_window -= old_failed
            self._slow_in_window -= old_slow
        self._window.append((failed, slow))
        self._failures_in_window += failed
        self._slow_in_window += slow

    def _open(self, reason: str) -> None:
        self._move(BreakerState.OPEN)
        self._opened_at = self._clock()
        self._reason = reason
        self._probes_left = 0
        self._held.clear()

    def _close(self) -> None:
        self._move(BreakerState.CLOSED)
        self._held.clear()
        self._window.clear()
        self._failures_in_window = 0
        self._slow_in_window = 0
        self._consecutive = 0

    def snapshot(self) -> BreakerSnapshot:
        """The breaker's state for the API."""
        with self._lock:
            now = self._clock()
            self._advance(now)
            calls = len(self._window)
            retry_in = 0.0
            if self._state is BreakerState.OPEN:
                retry_in = max(0.0, self.policy.open_duration - (now - self._opened_at))
            return BreakerSnapshot(
                name=self.name,
                state=self._state,
                failure_rate=self._failures_in_window / calls if calls else 0.0,
                slow_call_rate=self._slow_in_window / calls if calls else 0.0,
                calls_in_window=calls,
                consecutive_failures=self._consecutive,
                reason=self._reason,
                retry_in=retry_in,
            )

    def describe(self) -> str:
        """One line naming the breaker and its state, for error messages."""
        snap = self.snapshot()
        text = f"circuit breaker '{self.name}' is {snap.state.value}"
        if snap.reason:
            text += f" ({snap.reason})"
        if snap.state is BreakerState.OPEN:
            text += f"; half-open in {snap.retry_in:.1f}s"
        return text
