"""MeshMetrics: the OpenTelemetry instruments rpcmesh components record into.

Components call small methods (``client_call``, ``retry_attempt``, ``bus_published``,
``saga_finished`` ...) rather than touching instruments. With telemetry off they get
``MeshMetrics`` itself, whose methods do nothing, so no attribute dict is even built.
Gauges (breaker state, consumer lag, registry instances) are observable: components set
the latest value and the SDK reads it at collection time.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import grpc
from opentelemetry.metrics import CallbackOptions, Meter, Observation

if TYPE_CHECKING:
    from rpcmesh.telemetry.durations import DurationHistogram

BREAKER_STATES = ("closed", "half_open", "open")
"""Breaker states as reported in ``rpcmesh.breaker.state`` (value: 0 closed, 1 half-open, 2 open)."""

# Bucket bounds in seconds, from 0.5 ms up: RPCs on one machine are sub-millisecond.
DURATION_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip


class MeshMetrics:
    """The metrics API rpcmesh components call; this base class records nothing (telemetry off)."""

    enabled = False

    def client_call(self, service: str, method: str, code: grpc.StatusCode, duration_s: float) -> None:
        """One finished client call (all attempts included)."""

    def server_call(self, service: str, method: str, code: grpc.StatusCode, duration_s: float) -> None:
        """One finished server call."""

    def retry_attempt(self, service: str, method: str) -> None:
        """A retry attempt was sent (not counting the first attempt)."""

    def hedge_attempt(self, service: str, method: str) -> None:
        """A hedged attempt was sent."""

    def breaker_rejection(self, breaker: str) -> None:
        """A call was refused by an open breaker."""

    def breaker_transition(self, breaker: str, from_state: str, to_state: str) -> None:
        """A breaker changed state; also updates the ``rpcmesh.breaker.state`` gauge."""

    def bus_published(self, topic: str, count: int = 1) -> None:
        """Messages accepted for ``topic``."""

    def bus_delivered(self, topic: str, group: str, count: int = 1) -> None:
        """First deliveries to a consumer group."""

    def bus_redelivered(self, topic: str, group: str, count: int = 1) -> None:
        """Redeliveries (nak, ack deadline passed)."""

    def bus_dead_lettered(self, topic: str, group: str, reason: str, count: int = 1) -> None:
        """Messages moved to the dead-letter topic."""

    def set_consumer_lag(self, topic: str, group: str, lag: int) -> None:
        """Messages of ``topic`` not yet acknowledged by ``group`` (gauge)."""

    def saga_finished(self, definition: str, outcome: str, duration_s: float) -> None:
        """A saga reached a final state (``completed``, ``compensated``, ``failed_compensation`` ...)."""

    def set_registry_instances(self, service: str, health: str, count: int) -> None:
        """Registered instances of ``service`` in a health state (gauge)."""


CLIENT_DURATION = ("rpc.client.call.duration", "s", "Duration of client calls, all attempts included.")
SERVER_DURATION = ("rpc.server.call.duration", "s", "Duration of server calls.")
"""Name, unit and description of the call-duration histograms."""


class OtelMeshMetrics(MeshMetrics):
    """MeshMetrics recording into OpenTelemetry instruments of one ``Meter``.

    Args:
        meter: The meter of every instrument.
        durations: The client and server call-duration histograms aggregated by rpcmesh
            (``durations.DurationHistogram``, keyed by (service, method, code)); None: they go
            through the SDK's ``Histogram.record``.
    """

    enabled = True

    def __init__(
        self, meter: Meter, durations: tuple[DurationHistogram, DurationHistogram] | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._breaker_states: dict[str, str] = {}
        self._lags: dict[tuple[str, str], int] = {}
        self._instances: dict[tuple[str, str], int] = {}
        self._record_client: Callable[[tuple[str, str, grpc.StatusCode], float], None]
        self._record_server: Callable[[tuple[str, str, grpc.StatusCode], float], None]
        if durations is not None:
            self._record_client = durations[0].record
            self._record_server = durations[1].record
        else:
            self._record_client = _sdk_recorder(meter, CLIENT_DURATION)
            self._record_server = _sdk_recorder(meter, SERVER_DURATION)
        self._retries = meter.create_counter(
            "rpcmesh.client.retries", unit="{attempt}", description="Retry attempts."
        )
        self._hedges = meter.create_counter(
            "rpcmesh.client.hedges", unit="{attempt}", description="Hedged attempts."
        )
        self._rejections = meter.create_counter(
            "rpcmesh.breaker.rejections", unit="{call}", description="Calls refused by an open breaker."
        )
        self._transitions = meter.create_counter(
            "rpcmesh.breaker.transitions", unit="{transition}", description="Breaker state changes."
        )
        meter.create_observable_gauge(
            "rpcmesh.breaker.state",
            callbacks=[self._observe_breakers],
            description="Breaker state: 0 closed, 1 half-open, 2 open.",
        )
        self._published = meter.create_counter(
            "rpcmesh.bus.published", unit="{message}", description="Messages published."
        )
        self._delivered = meter.create_counter(
            "rpcmesh.bus.delivered", unit="{message}", description="First deliveries."
        )
        self._redelivered = meter.create_counter(
            "rpcmesh.bus.redelivered", unit="{message}", description="Redeliveries."
        )
        self._dead_lettered = meter.create_counter(
            "rpcmesh.bus.dead_lettered", unit="{message}", description="Messages moved to dead letters."
        )
        meter.create_observable_gauge(
            "rpcmesh.bus.consumer_lag",
            callbacks=[self._observe_lag],
            unit="{message}",
            description="Messages not yet acknowledged by a consumer group.",
        )
        self._saga_duration = meter.create_histogram(
            "rpcmesh.saga.duration", unit="s", description="Saga duration from start to its final state."
        )
        self._saga_outcomes = meter.create_counter(
            "rpcmesh.saga.outcomes", unit="{saga}", description="Sagas by final state."
        )
        meter.create_observable_gauge(
            "rpcmesh.registry.instances",
            callbacks=[self._observe_instances],
            unit="{instance}",
            description="Registered instances by service and health.",
        )

    def client_call(self, service: str, method: str, code: grpc.StatusCode, duration_s: float) -> None:  # noqa: D102
        self._record_client((service, method, code), duration_s)

    def server_call(self, service: str, method: str, code: grpc.StatusCode, duration_s: float) -> None:  # noqa: D102
        self._record_server((service, method, code), duration_s)

    def retry_attempt(self, service: str, method: str) -> None:  # noqa: D102
        self._retries.add(1, {"rpc.service": service, "rpc.method": method})

    def hedge_attempt(self, service: str, method: str) -> None:  # noqa: D102
        self._hedges.add(1, {"rpc.service": service, "rpc.method": method})

    def breaker_rejection(self, breaker: str) -> None:  # noqa: D102
        self._rejections.add(1, {"rpcmesh.breaker": breaker})

    def breaker_transition(self, breaker: str, from_state: str, to_state: str) -> None:  # noqa: D102
        self._transitions.add(1, {"rpcmesh.breaker": breaker, "from": from_state, "to": to_state})
        with self._lock:
            self._breaker_states[breaker] = to_state

    def bus_published(self, topic: str, count: int = 1) -> None:  # noqa: D102
        self._published.add(count, {"messaging.destination.name": topic})

    def bus_delivered(self, topic: str, group: str, count: int = 1) -> None:  # noqa: D102
        self._delivered.add(count, _bus_attributes(topic, group))

    def bus_redelivered(self, topic: str, group: str, count: int = 1) -> None:  # noqa: D102
        self._redelivered.add(count, _bus_attributes(topic, group))

    def bus_dead_lettered(self, topic: str, group: str, reason: str, count: int = 1) -> None:  # noqa: D102
        self._dead_lettered.add(count, {**_bus_attributes(topic, group), "reason": reason})

    def set_consumer_lag(self, topic: str, group: str, lag: int) -> None:  # noqa: D102
        with self._lock:
            self._lags[(topic, group)] = lag

    def saga_finished(self, definition: str, outcome: str, duration_s: float) -> None:  # noqa: D102
        attributes = {"rpcmesh.saga.definition": definition, "rpcmesh.saga.outcome": outcome}
        self._saga_outcomes.add(1, attributes)
        self._saga_duration.record(duration_s, attributes)

    def set_registry_instances(self, service: str, health: str, count: int) -> None:  # noqa: D102
        with self._lock:
            self._instances[(service, health)] = count

    def _observe_breakers(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            states = list(self._breaker_states.items())
        return [
            Observation(
                BREAKER_STATES.index(state) if state in BREAKER_STATES else -1, {"rpcmesh.breaker": name}
            )
            for name, state in states
        ]

    def _observe_lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            lags = list(self._lags.items())
        return [Observation(lag, _bus_attributes(topic, group)) for (topic, group), lag in lags]

    def _observe_instances(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            counts = list(self._instances.items())
        return [
            Observation(count, {"rpcmesh.service": service, "rpcmesh.health": health})
            for (service, health), count in counts
        ]


def _sdk_recorder(
    meter: Meter, spec: tuple[str, str, str]
) -> Callable[[tuple[str, str, grpc.StatusCode], float], None]:
    """Record call durations through the SDK's own histogram ``spec`` (name, unit, description)."""
    name, unit, description = spec
    record = meter.create_histogram(
        name, unit=unit, description=description, explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S
    ).record

    def record_key(key: tuple[str, str, grpc.StatusCode], value: float) -> None:
        record(value, _rpc_attributes(*key))

    return record_key


def rpc_attributes(key: tuple[str, str, grpc.StatusCode]) -> dict[str, str | int]:
    """The attributes of a call-duration series (service, method, code)."""
    return _rpc_attributes(*key)


@functools.lru_cache(maxsize=4096)
def _rpc_attributes(service: str, method: str, code: grpc.StatusCode) -> dict[str, str | int]:
    # Cached: built once per (service, method, code) rather than per call; callers never mutate it.
    return {
        "rpc.system": "grpc",
        "rpc.service": service,
        "rpc.method": method,
        "rpc.grpc.status_code": code.value[0],
    }


def _bus_attributes(topic: str, group: str) -> dict[str, str]:
    return {"messaging.destination.name": topic, "messaging.consumer.group.name": group}
