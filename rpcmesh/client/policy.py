"""Call policies: timeouts, retries (gRFC A6), hedging, circuit breakers, load balancing.

Policies are frozen, keyword-only dataclasses validated on construction, so an
invalid policy fails where it is written with a message naming the field. A
:class:`MeshPolicy` holds a default :class:`ServicePolicy` and per-service
overrides; a :class:`ServicePolicy` holds a default :class:`MethodPolicy` and
per-method overrides. :mod:`rpcmesh.client.policy_file` loads the same from
YAML or TOML.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import grpc

from rpcmesh.errors import RpcMeshError

__all__ = [
    "BreakerPolicy",
    "HedgingPolicy",
    "LoadBalancing",
    "MeshPolicy",
    "MethodPolicy",
    "PolicyError",
    "RetryBudgetPolicy",
    "RetryPolicy",
    "ServicePolicy",
    "parse_codes",
]

LoadBalancing = Literal["round_robin", "least_request"]

MAX_ATTEMPTS_LIMIT = 5
"""gRFC A6 caps attempts (the first included) at 5."""


class PolicyError(RpcMeshError, ValueError):
    """A policy is invalid; the message names the field (dotted path from files)."""


_CODES_BY_NAME = {code.name: code for code in grpc.StatusCode}


def parse_codes(values: Iterable[grpc.StatusCode | str | int], field_name: str) -> frozenset[grpc.StatusCode]:
    """Status codes from codes, names (``"UNAVAILABLE"``, case-insensitive) or numbers."""
    codes: set[grpc.StatusCode] = set()
    for value in values:
        if isinstance(value, grpc.StatusCode):
            codes.add(value)
        elif isinstance(value, str) and value.upper() in _CODES_BY_NAME:
            codes.add(_CODES_BY_NAME[value.upper()])
        elif isinstance(value, int) and not isinstance(value, bool):
            match = [code for code in grpc.StatusCode if code.value[0] == value]
            if not match:
                raise PolicyError(f"{field_name}: unknown status code {value}")
            codes.add(match[0])
        else:
            raise PolicyError(f"{field_name}: unknown status code {value!r}")
    if grpc.StatusCode.OK in codes:
        raise PolicyError(f"{field_name}: OK is not a failure code")
    return frozenset(codes)


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise PolicyError(f"{name}: must be a positive number of seconds, got {value!r}")


def _share(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0 < value <= 1):
        raise PolicyError(f"{name}: must be in (0, 1], got {value!r}")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Retries of a failed attempt, after gRFC A6."""

    max_attempts: int = 3
    """Attempts including the first, 2 to 5 (use ``retry=None`` for no retries)."""

    initial_backoff: float = 0.05
    """Ceiling of the first retry's random delay, seconds."""

    max_backoff: float = 1.0
    """Largest delay ceiling, seconds."""

    backoff_multiplier: float = 2.0
    """Growth of the delay ceiling per retry."""

    retryable_codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})
    """Codes that make an idempotent call retry (non-idempotent calls only retry attempts
    that never reached a server)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.max_attempts, int) and 2 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT):
            raise PolicyError(f"max_attempts: must be an integer from 2 to 5, got {self.max_attempts!r}")
        _positive("initial_backoff", self.initial_backoff)
        _positive("max_backoff", self.max_backoff)
        if self.max_backoff < self.initial_backoff:
            raise PolicyError("max_backoff: must be >= initial_backoff")
        if not (isinstance(self.backoff_multiplier, int | float) and self.backoff_multiplier >= 1):
            raise PolicyError(f"backoff_multiplier: must be >= 1, got {self.backoff_multiplier!r}")
        object.__setattr__(self, "retryable_codes", parse_codes(self.retryable_codes, "retryable_codes"))
        if not self.retryable_codes:
            raise PolicyError("retryable_codes: must name at least one code")


@dataclass(frozen=True, kw_only=True)
class HedgingPolicy:
    """Hedged calls: more attempts to other instances while the first is still running."""

    max_attempts: int = 2
    """Attempts including the first, 2 to 5."""

    delay: float = 0.05
    """Seconds between starting one attempt and the next."""

    non_fatal_codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})
    """A failure with one of these codes starts the next attempt at once instead of failing the call."""

    def __post_init__(self) -> None:
        if not (isinstance(self.max_attempts, int) and 2 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT):
            raise PolicyError(f"max_attempts: must be an integer from 2 to 5, got {self.max_attempts!r}")
        if not (isinstance(self.delay, int | float) and 0 <= self.delay < 3600):
            raise PolicyError(f"delay: must be a number of seconds >= 0, got {self.delay!r}")
        object.__setattr__(self, "non_fatal_codes", parse_codes(self.non_fatal_codes, "non_fatal_codes"))


@dataclass(frozen=True, kw_only=True)
class MethodPolicy:
    """How calls of one method (or of every method of a service by default) behave."""

    timeout: float | None = None
    """Default deadline in seconds when the caller gives none; None for no default."""

    idempotent: bool = False
    """Whether the method may safely run twice; only then are failures that reached a server retried."""

    retry: RetryPolicy | None = field(default_factory=RetryPolicy)
    """Retry policy; None disables retries."""

    hedging: HedgingPolicy | None = None
    """Hedging policy (unary calls of idempotent methods only); excludes ``retry``."""

    wait_for_ready: bool = False
    """Queue attempts until the chosen instance's connection is ready instead of failing fast."""

    def __post_init__(self) -> None:
        if self.timeout is not None:
            _positive("timeout", self.timeout)
        if self.hedging is not None:
            if not self.idempotent:
                raise PolicyError("hedging: only idempotent methods may be hedged (set idempotent: true)")
            object.__setattr__(self, "retry", None)


@dataclass(frozen=True, kw_only=True)
class BreakerPolicy:
    """A circuit breaker: closed, open (calls fail fast or the instance is ejected), half-open."""

    consecutive_failures: int = 5
    """Open after this many failures in a row; 0 disables this trigger."""

    failure_rate: float = 0.5
    """Open when at least this share of the calls in the window failed."""

    window: int = 20
    """Number of most recent calls the rates are computed over."""

    minimum_calls: int = 10
    """Rates are only judged once the window holds this many calls."""

    slow_call_duration: float | None = None
    """A call taking longer counts as slow; None disables the slow-call trigger."""

    slow_call_rate: float = 1.0
    """Open when at least this share of the calls in the window was slow."""

    open_duration: float = 5.0
    """Seconds an open breaker waits before letting probes through (half-open)."""

    half_open_probes: int = 3
    """Probe calls let through when half-open; all must succeed to close."""

    max_probe_hold: float = 60.0
    """Longest a half-open probe permit is held (a call holds it at most until its deadline):
    a probe that never reports back is then given back, so the breaker cannot stay half-open."""

    failure_codes: frozenset[grpc.StatusCode] = frozenset(
        {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNKNOWN,
        }
    )
    """Codes counted as failures; any other outcome counts as a success."""

    def __post_init__(self) -> None:
        if not (isinstance(self.consecutive_failures, int) and self.consecutive_failures >= 0):
            raise PolicyError(
                f"consecutive_failures: must be an integer >= 0, got {self.consecutive_failures!r}"
            )
        _share("failure_rate", self.failure_rate)
        if not (isinstance(self.window, int) and self.window >= 1):
            raise PolicyError(f"window: must be an integer >= 1, got {self.window!r}")
        if not (isinstance(self.minimum_calls, int) and 1 <= self.minimum_calls <= self.window):
            raise PolicyError(f"minimum_calls: must be an integer from 1 to window ({self.window})")
        if self.slow_call_duration is not None:
            _positive("slow_call_duration", self.slow_call_duration)
        _share("slow_call_rate", self.slow_call_rate)
        _positive("open_duration", self.open_duration)
        if not (isinstance(self.half_open_probes, int) and self.half_open_probes >= 1):
            raise PolicyError(f"half_open_probes: must be an integer >= 1, got {self.half_open_probes!r}")
        _positive("max_probe_hold", self.max_probe_hold)
        object.__setattr__(self, "failure_codes", parse_codes(self.failure_codes, "failure_codes"))


@dataclass(frozen=True, kw_only=True)
class RetryBudgetPolicy:
    """Per-service retry budget: gRFC A6 retry throttling (a token bucket).

    Every failed attempt takes a token, every success puts back ``token_ratio``;
    retries and hedges are only sent while more than half the tokens remain, so
    a failing backend sees barely more attempts than calls.
    """

    max_tokens: float = 100.0
    """Bucket size (1 to 1000)."""

    token_ratio: float = 0.1
    """Tokens a success puts back (0 to 1)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.max_tokens, int | float) and 1 <= self.max_tokens <= 1000):
            raise PolicyError(f"max_tokens: must be from 1 to 1000, got {self.max_tokens!r}")
        if not (isinstance(self.token_ratio, int | float) and 0 < self.token_ratio <= 1):
            raise PolicyError(f"token_ratio: must be in (0, 1], got {self.token_ratio!r}")


@dataclass(frozen=True, kw_only=True)
class ServicePolicy:
    """Policies for calls to one service."""

    method: MethodPolicy = field(default_factory=MethodPolicy)
    """Policy of methods not named in ``methods``."""

    methods: Mapping[str, MethodPolicy] = field(default_factory=dict)
    """Per-method policies, keyed by method name (``Echo``) or full path (``/echo.v1.Echo/Echo``)."""

    load_balancing: LoadBalancing = "round_robin"
    """``round_robin`` or ``least_request`` (power of two choices on outstanding calls)."""

    prefer_zone: str = ""
    """Pick instances in this zone while any is admissible; empty for no preference."""

    instance_breaker: BreakerPolicy | None = field(default_factory=BreakerPolicy)
    """Breaker per instance: an open one ejects the instance from picking. None disables."""

    service_breaker: BreakerPolicy | None = field(
        default_factory=lambda: BreakerPolicy(
            consecutive_failures=0, failure_rate=0.9, window=50, minimum_calls=20
        )
    )
    """Breaker over the whole service's call outcomes: when open, calls fail fast. None disables."""

    max_ejection_share: float = 0.5
    """Largest share of instances breakers may eject at once (at least one is always ejectable;
    when every instance is ejected, calls go to all of them: panic routing)."""

    retry_budget: RetryBudgetPolicy = field(default_factory=RetryBudgetPolicy)
    """Retry throttling for the service."""

    max_buffered_request_bytes: int = 256 * 1024
    """Request-stream bytes kept for replay on retry; beyond this the call is committed (no retry)."""

    def __post_init__(self) -> None:
        if self.load_balancing not in ("round_robin", "least_request"):
            raise PolicyError(
                f"load_balancing: must be 'round_robin' or 'least_request', got {self.load_balancing!r}"
            )
        _share("max_ejection_share", self.max_ejection_share)
        if not (isinstance(self.max_buffered_request_bytes, int) and self.max_buffered_request_bytes >= 0):
            raise PolicyError("max_buffered_request_bytes: must be an integer >= 0")
        object.__setattr__(self, "methods", dict(self.methods))

    def for_method(self, method: str) -> MethodPolicy:
        """The policy of ``method`` given as a full path ``/pkg.Service/Method``."""
        if not self.methods:
            return self.method
        policy = self.methods.get(method)
        if policy is None:
            policy = self.methods.get(method.rsplit("/", 1)[-1])
        if policy is None:
            policy = self.methods.get(method.lstrip("/"))
        return policy or self.method


@dataclass(frozen=True, kw_only=True)
class MeshPolicy:
    """Policies for every service a mesh calls."""

    default: ServicePolicy = field(default_factory=ServicePolicy)
    """Policy of services not named in ``services``."""

    services: Mapping[str, ServicePolicy] = field(default_factory=dict)
    """Per-service policies by service name."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", dict(self.services))

    def for_service(self, service: str) -> ServicePolicy:
        """The policy of ``service``."""
        return self.services.get(service, self.default)
