"""Endpoint picking, pure: round robin or least outstanding (power of two choices).

Also zone preference, breaker ejection with a cap, avoidance of instances
whose connection failed, and panic routing: when breakers refuse every
instance, the call goes to any of them rather than failing (Envoy's panic
threshold), since a service whose every instance is ejected is better served
by a chance than by a certain error. The picker only chooses; the caller takes
the chosen instance's breaker permit (:meth:`CircuitBreaker.take`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from rpcmesh.client.breaker import CircuitBreaker
from rpcmesh.client.policy import LoadBalancing

__all__ = ["EndpointState", "NoEndpointError", "Picker"]


class NoEndpointError(Exception):
    """No instance can take the call; the message says why (and names breakers).

    Attributes:
        breakers: Names of the breakers that refused the call (empty when none did).
        peers: Addresses of the instances whose breakers refused it.
    """

    def __init__(self, message: str, *, breakers: tuple[str, ...] = (), peers: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.breakers = breakers
        self.peers = peers


@dataclass(eq=False)
class EndpointState:
    """What the decision core knows about one instance."""

    instance_id: str
    """Registry instance id."""

    address: str
    """host:port."""

    zone: str = ""
    """The instance's zone."""

    breaker: CircuitBreaker | None = None
    """Per-instance breaker, when enabled."""

    outstanding: int = 0
    """Attempts in flight on this instance."""

    picks: int = 0
    """Attempts ever sent to this instance."""

    connection_failed: bool = False
    """The shell saw its connection fail (TRANSIENT_FAILURE) and not recover yet."""

    extra: dict[str, object] = field(default_factory=dict)
    """Shell-owned data (e.g. the sub-channel)."""


class Picker:
    """Chooses the endpoint of an attempt. Not thread-safe: callers hold the service lock."""

    def __init__(
        self,
        strategy: LoadBalancing = "round_robin",
        *,
        prefer_zone: str = "",
        max_ejection_share: float = 0.5,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.strategy = strategy
        self.prefer_zone = prefer_zone
        self.max_ejection_share = max_ejection_share
        self._rand = rand
        self._next = 0

    def pick(
        self, service: str, endpoints: Sequence[EndpointState], exclude: Collection[str] = ()
    ) -> EndpointState:
        """Pick one endpoint (its breaker permit is the caller's to take).

        Args:
            service: Service name, for error messages.
            endpoints: Passing instances, in a stable order.
            exclude: Instance ids already tried by this call; avoided while another remains.

        Raises:
            NoEndpointError: No instance is registered.
        """
        if not endpoints:
            raise NoEndpointError(f"no passing instance of service '{service}' is registered")
        pool: Sequence[EndpointState] = endpoints
        ejected = self._ejected(endpoints)
        if ejected:
            # Every instance ejected: panic routing, all of them stay pickable.
            pool = [e for e in endpoints if e not in ejected] or endpoints
        if exclude:
            pool = _prefer(pool, lambda e: e.instance_id not in exclude)
        if any(e.connection_failed for e in pool):
            pool = _prefer(pool, lambda e: not e.connection_failed)
        if self.prefer_zone:
            pool = _prefer(pool, lambda e: e.zone == self.prefer_zone)
        chosen = self._choose(pool)
        chosen.picks += 1
        return chosen

    def _ejected(self, endpoints: Sequence[EndpointState]) -> list[EndpointState]:
        refusing = [e for e in endpoints if e.breaker is not None and not e.breaker.admits()]
        if not refusing:
            return refusing
        cap = max(1, math.floor(self.max_ejection_share * len(endpoints)))
        # Beyond the cap, instances stay pickable despite their open breakers,
        # so a wide outage cannot eject the whole service on breaker noise.
        return refusing[:cap]

    def _choose(self, pool: Sequence[EndpointState]) -> EndpointState:
        if len(pool) == 1:
            return pool[0]
        if self.strategy == "least_request":
            first = int(self._rand() * len(pool))
            second = int(self._rand() * (len(pool) - 1))
            if second >= first:
                second += 1
            a, b = pool[first], pool[second]
            return a if a.outstanding <= b.outstanding else b
        self._next = (self._next + 1) % (1 << 30)
        return pool[self._next % len(pool)]


def _prefer(pool: Sequence[EndpointState], keep: Callable[[EndpointState], bool]) -> list[EndpointState]:
    """The endpoints that satisfy ``keep``, or all of them when none does."""
    preferred = [e for e in pool if keep(e)]
    return preferred or list(pool)
