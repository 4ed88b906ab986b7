"""The decision core of one service: its passing instances (from Watch), breakers, budget and picker.

:class:`ServiceCore` is pure and thread-safe: both the asyncio and the sync
shells feed it Registry watch responses and ask it for endpoints; they only
own the sockets (one sub-channel per instance).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from rpcmesh.client.breaker import BreakerPermit, BreakerSnapshot, CircuitBreaker, TransitionListener
from rpcmesh.client.budget import RetryBudget
from rpcmesh.client.picker import EndpointState, NoEndpointError, Picker
from rpcmesh.client.policy import ServicePolicy
from rpcmesh.v1 import registry_pb2

__all__ = ["EndpointChanges", "EndpointView", "ServiceCore", "is_passing"]

_PUT = registry_pb2.WATCH_EVENT_TYPE_PUT
_DELETE = registry_pb2.WATCH_EVENT_TYPE_DELETE
_HEALTH = registry_pb2.WATCH_EVENT_TYPE_HEALTH


def is_passing(instance: registry_pb2.Instance) -> bool:
    """Whether an instance should receive traffic."""
    return (
        instance.health != registry_pb2.HEALTH_STATE_CRITICAL
        and instance.reported_status != registry_pb2.SERVING_STATUS_NOT_SERVING
    )


@dataclass(frozen=True)
class EndpointChanges:
    """What a watch response changed: endpoints to open and endpoints to close."""

    added: tuple[EndpointState, ...] = ()
    removed: tuple[EndpointState, ...] = ()


@dataclass(frozen=True)
class EndpointView:
    """One instance as the API reports it."""

    instance_id: str
    address: str
    zone: str
    outstanding: int
    picks: int
    connection_failed: bool
    breaker: BreakerSnapshot | None


class ServiceCore:
    """Instances, breakers, retry budget and picker of one service."""

    def __init__(
        self,
        service: str,
        policy: ServicePolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        on_breaker_transition: TransitionListener | None = None,
    ) -> None:
        self.service = service
        self._on_breaker_transition = on_breaker_transition
        self.policy = policy
        self.clock = clock
        self.rand = rand
        self.lock = threading.Lock()
        self.revision = 0
        self.synced = False
        self._endpoints: dict[str, EndpointState] = {}
        self._order: list[EndpointState] = []
        self._prepare: Callable[[EndpointState], None] | None = None
        self.picker = Picker(
            policy.load_balancing,
            prefer_zone=policy.prefer_zone,
            max_ejection_share=policy.max_ejection_share,
            rand=rand,
        )
        self.budget = RetryBudget(policy.retry_budget)
        self.breaker = (
            CircuitBreaker(
                f"service {service}", policy.service_breaker, clock, on_transition=on_breaker_transition
            )
            if policy.service_breaker is not None
            else None
        )

    # -- discovery ---------------------------------------------------------------------------------------

    def apply(
        self,
        response: registry_pb2.WatchResponse,
        prepare: Callable[[EndpointState], None] | None = None,
    ) -> EndpointChanges:
        """Apply one watch response (a snapshot replaces everything; events patch it).

        Args:
            response: The watch response.
            prepare: Called for each new endpoint before other threads can pick it
                (the sync shell opens its sub-channel there).
        """
        with self.lock:
            self._prepare = prepare
            added: list[EndpointState] = []
            removed: list[EndpointState] = []
            if response.snapshot:
                wanted = {e.instance.instance_id: e.instance for e in response.events if e.type == _PUT}
                for instance_id in list(self._endpoints):
                    current = self._endpoints[instance_id]
                    instance = wanted.get(instance_id)
                    if instance is None or not is_passing(instance) or instance.address != current.address:
                        removed.append(self._endpoints.pop(instance_id))
                for instance in wanted.values():
                    endpoint = self._upsert(instance, removed)
                    if endpoint is not None:
                        added.append(endpoint)
                self.synced = True
            else:
                for event in response.events:
                    if event.instance.service and event.instance.service != self.service:
                        continue
                    if event.type == _DELETE:
                        gone = self._endpoints.pop(event.instance.instance_id, None)
                        if gone is not None:
                            removed.append(gone)
                    elif event.type in (_PUT, _HEALTH):
                        endpoint = self._upsert(event.instance, removed)
                        if endpoint is not None:
                            added.append(endpoint)
            # A snapshot replaces everything, its revision too: after one taken at an older
            # revision (another registry, or a node that read less of the log) the next resume
            # must start there, or the events in between are skipped for good.
            self.revision = response.revision if response.snapshot else max(self.revision, response.revision)
            self._order = sorted(self._endpoints.values(), key=lambda e: e.instance_id)
            return EndpointChanges(tuple(added), tuple(removed))

    def _upsert(self, instance: registry_pb2.Instance, removed: list[EndpointState]) -> EndpointState | None:
        current = self._endpoints.get(instance.instance_id)
        if not is_passing(instance):
            if current is not None:
                removed.append(self._endpoints.pop(instance.instance_id))
            return None
        if current is not None:
            if current.address == instance.address:
                current.zone = instance.zone
                return None
            removed.append(self._endpoints.pop(instance.instance_id))
        breaker_policy = self.policy.instance_breaker
        endpoint = EndpointState(
            instance_id=instance.instance_id,
            address=instance.address,
            zone=instance.zone,
            breaker=(
                CircuitBreaker(
                    f"instance {self.service}/{instance.instance_id}",
                    breaker_policy,
                    self.clock,
                    on_transition=self._on_breaker_transition,
                )
                if breaker_policy is not None
                else None
            ),
        )
        if self._prepare is not None:
            self._prepare(endpoint)
        self._endpoints[instance.instance_id] = endpoint
        return endpoint

    def clear(self) -> tuple[EndpointState, ...]:
        """Forget every endpoint (on close); returns them so the shell closes their channels."""
        with self.lock:
            gone = tuple(self._endpoints.values())
            self._endpoints.clear()
            self._order = []
            return gone

    # -- picking -----------------------------------------------------------------------------------------

    def pick(self, exclude: Collection[str] = ()) -> EndpointState:
        """Pick the endpoint of one attempt and count it as outstanding."""
        with self.lock:
            endpoint = self.picker.pick(self.service, self._order, exclude)
            endpoint.outstanding += 1
            return endpoint

    def admit(self, hold: float | None) -> BreakerPermit | None:
        """Take the service breaker's permit for one call (None when there is no service breaker).

        Args:
            hold: The call's remaining time; a half-open probe permit is taken back after it.

        Raises:
            NoEndpointError: The service breaker is open (or half-open with every probe taken).
        """
        if self.breaker is None:
            return None
        permit = self.breaker.take(hold)
        if permit is None:
            raise NoEndpointError(self.breaker.describe(), breakers=(self.breaker.name,))
        return permit

    def admit_call(self) -> None:
        """Check the service breaker at the start of a call.

        Raises:
            NoEndpointError: The service breaker is open.
        """
        if self.breaker is not None and not self.breaker.acquire():
            raise NoEndpointError(self.breaker.describe(), breakers=(self.breaker.name,))

    def endpoints(self) -> list[EndpointView]:
        """The current instances with their load and breaker state."""
        with self.lock:
            order = list(self._order)
        return [
            EndpointView(
                instance_id=e.instance_id,
                address=e.address,
                zone=e.zone,
                outstanding=e.outstanding,
                picks=e.picks,
                connection_failed=e.connection_failed,
                breaker=e.breaker.snapshot() if e.breaker is not None else None,
            )
            for e in order
        ]

    def get(self, instance_id: str) -> EndpointState | None:
        """The endpoint of an instance, if present."""
        with self.lock:
            return self._endpoints.get(instance_id)
