"""Consul-style flap damping of active health probes: N failures to turn critical, M successes back.

Pure: :func:`observe` maps a damper state and one probe result to the next
state, so the rule is tested without sockets or time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DamperState:
    """Where an instance's probes stand."""

    passing: bool = True
    """The damped verdict."""
    failures: int = 0
    """Consecutive failures seen while passing."""
    successes: int = 0
    """Consecutive successes seen while critical."""


def observe(
    state: DamperState, ok: bool, *, failures_before_critical: int, successes_before_passing: int
) -> DamperState:
    """The state after one probe result.

    A passing instance turns critical after ``failures_before_critical``
    consecutive failures; a critical one turns passing after
    ``successes_before_passing`` consecutive successes. Thresholds below 1 count as 1.
    """
    if state.passing:
        if ok:
            return DamperState(passing=True)
        failures = state.failures + 1
        if failures >= max(1, failures_before_critical):
            return DamperState(passing=False)
        return DamperState(passing=True, failures=failures)
    if not ok:
        return DamperState(passing=False)
    successes = state.successes + 1
    if successes >= max(1, successes_before_passing):
        return DamperState(passing=True)
    return DamperState(passing=False, successes=successes)
