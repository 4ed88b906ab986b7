"""When an unacknowledged delivery comes back, and when it is given up (pure).

A delivery that is nakked without a delay, or not acknowledged within its ack
deadline, is redelivered after a backoff that starts at the subscription's
``redelivery_backoff`` and doubles per attempt, capped at ``MAX_BACKOFF``. After
``max_deliveries`` attempts the message is dead-lettered instead.
"""

from __future__ import annotations

MAX_BACKOFF = 300.0
"""Longest redelivery delay in seconds, whatever the attempt count."""


def redelivery_delay(attempt: int, base: float, cap: float = MAX_BACKOFF) -> float:
    """Seconds to wait before redelivering a message whose ``attempt``-th delivery failed.

    Args:
        attempt: The attempt that failed, from 1.
        base: The first delay (after attempt 1).
        cap: The longest delay.
    """
    if attempt < 1:
        raise ValueError(f"attempt: must be >= 1, got {attempt}")
    if base <= 0:
        return 0.0
    exponent = min(attempt - 1, 32)
    return float(min(cap, base * (2**exponent)))


def exhausted(attempt: int, max_deliveries: int) -> bool:
    """True when a message delivered ``attempt`` times may not be delivered again."""
    return max_deliveries > 0 and attempt >= max_deliveries
