"""Retry budget: gRFC A6 retry throttling as a token bucket shared by a service's calls."""

from __future__ import annotations

import threading

from rpcmesh.client.policy import RetryBudgetPolicy

__all__ = ["RetryBudget"]


class RetryBudget:
    """Token bucket: failures take a token, successes return ``token_ratio``.

    Retries (and hedged attempts) are allowed only while more than half of
    ``max_tokens`` remain. Under a backend that fails every call the bucket
    drains and calls stop being retried, so the backend sees about one attempt
    per call.
    """

    def __init__(self, policy: RetryBudgetPolicy) -> None:
        self.policy = policy
        self._tokens = float(policy.max_tokens)
        self._lock = threading.Lock()
        self.retries_allowed = 0
        self.retries_denied = 0

    @property
    def tokens(self) -> float:
        """Tokens currently in the bucket."""
        return self._tokens

    def on_success(self) -> None:
        """An attempt succeeded (or failed with a code that is not retryable)."""
        with self._lock:
            self._tokens = min(self.policy.max_tokens, self._tokens + self.policy.token_ratio)

    def on_failure(self) -> None:
        """An attempt failed with a retryable code."""
        with self._lock:
            self._tokens = max(0.0, self._tokens - 1)

    def allow_retry(self) -> bool:
        """Whether one more attempt may be sent; counts the decision."""
        with self._lock:
            allowed = self._tokens > self.policy.max_tokens / 2
            if allowed:
                self.retries_allowed += 1
            else:
                self.retries_denied += 1
            return allowed
