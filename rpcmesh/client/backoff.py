"""Backoff schedules: gRFC A6 retry delays and reconnect backoff, both pure and seedable."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ExponentialBackoff", "retry_delay"]


def retry_delay(
    retry_number: int,
    *,
    initial: float,
    maximum: float,
    multiplier: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before retry ``retry_number`` (1 for the first retry), as gRFC A6 defines it.

    The delay is drawn uniformly from ``[0, min(initial * multiplier**(n-1), maximum))``
    ("full jitter"), so clients that failed together do not retry together.
    """
    if retry_number < 1:
        raise ValueError(f"retry_number: must be >= 1, got {retry_number}")
    ceiling = min(initial * multiplier ** (retry_number - 1), maximum)
    return rand() * ceiling


@dataclass
class ExponentialBackoff:
    """Reconnect backoff: grows by ``multiplier`` up to ``maximum``, with +-``jitter`` share.

    ``next()`` returns the next delay; ``reset()`` after a success starts over.
    """

    initial: float = 0.1
    """First delay in seconds."""

    maximum: float = 5.0
    """Largest delay in seconds."""

    multiplier: float = 2.0
    """Growth per failure."""

    jitter: float = 0.2
    """Each delay is multiplied by a random factor in [1 - jitter, 1 + jitter]."""

    rand: Callable[[], float] = random.random
    """Source of randomness in [0, 1); injectable for tests."""

    _failures: int = 0

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial:
            raise ValueError("initial: must be > 0 and <= maximum")
        if self.multiplier < 1:
            raise ValueError(f"multiplier: must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter: must be in [0, 1), got {self.jitter}")

    def next(self) -> float:
        """The delay before the next attempt; grows with every call."""
        base = min(self.initial * self.multiplier**self._failures, self.maximum)
        self._failures += 1
        factor = 1 + self.jitter * (2 * self.rand() - 1)
        return base * factor

    def reset(self) -> None:
        """Forget past failures (call after a success)."""
        self._failures = 0
