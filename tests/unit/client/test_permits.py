"""Breaker permits and gRFC A6 details of the pure decision core (issue 15, items 2, 4 and 6)."""

from __future__ import annotations

import random

import grpc
import pytest
from rpcmesh.v1 import registry_pb2

from rpcmesh.client.attempts import MAX_TRANSPARENT_RETRIES, AttemptOutcome, CallController
from rpcmesh.client.breaker import BreakerState, CircuitBreaker
from rpcmesh.client.endpoints import ServiceCore
from rpcmesh.client.policy import (
    BreakerPolicy,
    HedgingPolicy,
    MethodPolicy,
    RetryPolicy,
    ServicePolicy,
)

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
OK = grpc.StatusCode.OK


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def half_open(clock: Clock, probes: int = 2, **policy: object) -> CircuitBreaker:
    breaker = CircuitBreaker(
        "b",
        BreakerPolicy(consecutive_failures=1, open_duration=1, half_open_probes=probes, **policy),  # type: ignore[arg-type]
        clock,
    )
    breaker.record(failed=True)
    clock.now += 1
    assert breaker.state is BreakerState.HALF_OPEN
    return breaker


def test_a_released_probe_permit_is_admitted_again_and_resolving_twice_is_ignored() -> None:
    clock = Clock()
    breaker = half_open(clock)
    first, second = breaker.take(), breaker.take()
    assert first is not None and second is not None and first.probe
    assert breaker.take() is None  # both probes held
    first.release()
    first.release()
    first.record(failed=True)  # already resolved: ignored, the breaker stays half-open
    assert breaker.state is BreakerState.HALF_OPEN
    third = breaker.take()
    assert third is not None and breaker.take() is None
    second.record(failed=False)
    third.record(failed=False)
    assert breaker.state is BreakerState.CLOSED


def test_an_unresolved_probe_permit_expires_at_its_hold_time() -> None:
    clock = Clock()
    breaker = half_open(clock, probes=1, max_probe_hold=10.0)
    held = breaker.take(hold=2.0)
    assert held is not None and breaker.take() is None
    clock.now += 2.0
    assert breaker.admits()  # the backstop gave it back
    again = breaker.take(hold=None)  # no deadline: the policy's maximum
    assert again is not None and again.expires_at == pytest.approx(clock.now + 10.0)
    held.record(failed=True)  # expired: its late outcome is not a probe result
    assert breaker.state is BreakerState.HALF_OPEN
    again.record(failed=False)
    assert breaker.state is BreakerState.CLOSED


def test_a_call_admitted_while_closed_is_not_counted_as_a_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(
        "b", BreakerPolicy(consecutive_failures=1, open_duration=1, half_open_probes=1), clock
    )
    early = breaker.take()
    assert early is not None and not early.probe
    breaker.record(failed=True)
    clock.now += 1
    assert breaker.state is BreakerState.HALF_OPEN
    early.record(failed=False)  # it says nothing about the recovery
    assert breaker.state is BreakerState.HALF_OPEN
    probe = breaker.take()
    assert probe is not None and probe.probe


def core_with(clock: Clock, method: MethodPolicy, *instances: str, **service: object) -> ServiceCore:
    core = ServiceCore("s", ServicePolicy(method=method, **service), clock=clock, rand=lambda: 0.5)  # type: ignore[arg-type]
    events = [
        registry_pb2.WatchEvent(
            type=registry_pb2.WATCH_EVENT_TYPE_PUT,
            instance=registry_pb2.Instance(service="s", instance_id=i, address=f"h:{i}"),
            revision=1,
        )
        for i in instances
    ]
    core.apply(registry_pb2.WatchResponse(snapshot=True, revision=1, events=events))
    return core


@pytest.mark.parametrize("seed", range(20))
def test_calls_released_at_any_point_leave_no_permit_held(seed: int) -> None:
    """Cancel (release) calls at random points of their life in half-open; the breakers still close."""
    rng = random.Random(seed)
    clock = Clock()
    breaker = BreakerPolicy(consecutive_failures=1, open_duration=1, half_open_probes=3)
    hedged = MethodPolicy(idempotent=True, hedging=HedgingPolicy(max_attempts=3, delay=0.01))
    core = core_with(clock, hedged, "a", service_breaker=breaker, instance_breaker=breaker)
    assert core.breaker is not None
    core.breaker.record(failed=True)
    endpoint = core.get("a")
    assert endpoint is not None and endpoint.breaker is not None
    endpoint.breaker.record(failed=True)
    clock.now += 1
    for trial in range(6):
        ctl = CallController(core, "/s.S/M", hedged, clock.now + 5)
        ctl.start()
        for _ in range(rng.randrange(0, 4)):  # attempts started (hedges) before the cancel lands
            clock.now += 0.01
            if ctl.attempts == 0 or ctl.may_hedge():
                ctl.begin_attempt()
        ctl.release()
        ctl.release()  # idempotent
        assert endpoint.outstanding == 0, f"seed={seed} trial={trial}"
        assert core.breaker.admits() and endpoint.breaker.admits(), f"seed={seed} trial={trial}"
    for _ in range(3):
        ctl = CallController(core, "/s.S/M", hedged, None)
        ctl.start()
        attempt = ctl.begin_attempt()
        ctl.end_hedge(attempt, AttemptOutcome(code=OK))
        ctl.finish(OK)
        ctl.release()
    assert core.breaker.state is BreakerState.CLOSED, f"seed={seed}"
    assert endpoint.breaker.state is BreakerState.CLOSED, f"seed={seed}"


def test_a_lost_hedge_gives_its_probe_permit_back() -> None:
    clock = Clock()
    breaker = BreakerPolicy(consecutive_failures=1, open_duration=1, half_open_probes=1)
    hedged = MethodPolicy(idempotent=True, hedging=HedgingPolicy(max_attempts=2, delay=0.01))
    core = core_with(clock, hedged, "a", "b", instance_breaker=breaker, service_breaker=None)
    slow = core.get("b")  # round robin's first pick
    assert slow is not None and slow.breaker is not None
    slow.breaker.record(failed=True)
    clock.now += 1
    ctl = CallController(core, "/s.S/M", hedged, None)
    ctl.start()
    first = ctl.begin_attempt()
    assert first.endpoint is slow and first.permit is not None and first.permit.probe
    clock.now += 0.01
    assert ctl.may_hedge()
    winner = ctl.begin_attempt()
    assert winner.endpoint.instance_id == "a"
    ctl.end_hedge(winner, AttemptOutcome(code=OK))
    ctl.finish(OK)
    ctl.abandon_attempt(first)  # the loser is cancelled
    assert slow.breaker.admits() and slow.outstanding == 0


def test_transparent_retries_do_not_count_against_max_attempts() -> None:
    clock = Clock()
    method = MethodPolicy(idempotent=False, retry=RetryPolicy(max_attempts=2))
    core = core_with(clock, method, "a", "b")
    ctl = CallController(core, "/s.S/M", method, None)
    ctl.start()
    never_sent = AttemptOutcome(code=UNAVAILABLE, reached_server=False)
    for _ in range(MAX_TRANSPARENT_RETRIES):
        assert ctl.end_attempt(ctl.begin_attempt(), never_sent) is not None
    # Transparent retries spent: a connection refusal now counts like any attempt.
    assert ctl.end_attempt(ctl.begin_attempt(), never_sent) is not None
    assert ctl.end_attempt(ctl.begin_attempt(), never_sent) is None  # max_attempts=2 counted ones
    idempotent = MethodPolicy(idempotent=True, retry=RetryPolicy(max_attempts=2))
    ctl = CallController(core, "/s.S/M", idempotent, None)
    ctl.start()
    assert ctl.end_attempt(ctl.begin_attempt(), never_sent) is not None
    assert ctl.end_attempt(ctl.begin_attempt(), AttemptOutcome(code=UNAVAILABLE)) is not None
    assert ctl.end_attempt(ctl.begin_attempt(), AttemptOutcome(code=UNAVAILABLE)) is None
    assert ctl.attempts == 3  # one transparent retry plus the two max_attempts allow
    no_policy = MethodPolicy(retry=None)
    ctl = CallController(core, "/s.S/M", no_policy, None)
    ctl.start()
    assert ctl.end_attempt(ctl.begin_attempt(), never_sent) is not None  # transparent even so
    assert ctl.end_attempt(ctl.begin_attempt(), AttemptOutcome(code=UNAVAILABLE)) is None


def test_a_non_retryable_failure_leaves_the_retry_budget_alone() -> None:
    clock = Clock()
    method = MethodPolicy(idempotent=True)
    core = core_with(clock, method, "a")
    for _ in range(10):
        core.budget.on_failure()
    before = core.budget.tokens
    ctl = CallController(core, "/s.S/M", method, None)
    ctl.start()
    assert ctl.end_attempt(ctl.begin_attempt(), AttemptOutcome(code=grpc.StatusCode.INVALID_ARGUMENT)) is None
    assert core.budget.tokens == before
    hedged = MethodPolicy(idempotent=True, hedging=HedgingPolicy())
    ctl = CallController(core, "/s.S/M", hedged, None)
    ctl.start()
    assert not ctl.end_hedge(ctl.begin_attempt(), AttemptOutcome(code=grpc.StatusCode.NOT_FOUND))
    assert core.budget.tokens == before


def test_hedging_obeys_server_pushback() -> None:
    clock = Clock()
    hedged = MethodPolicy(idempotent=True, hedging=HedgingPolicy(max_attempts=3, delay=0.05))
    core = core_with(clock, hedged, "a", "b", "c")
    ctl = CallController(core, "/s.S/M", hedged, None)
    ctl.start()
    first = ctl.begin_attempt()
    assert ctl.end_hedge(first, AttemptOutcome(code=UNAVAILABLE, pushback_ms=300))
    assert not ctl.may_hedge() and ctl.hedge_wait() == pytest.approx(0.3)
    clock.now += 0.3
    assert ctl.may_hedge()
    second = ctl.begin_attempt()
    assert ctl.end_hedge(second, AttemptOutcome(code=UNAVAILABLE, pushback_ms=-1))
    assert ctl.hedge_wait() is None and not ctl.may_hedge()  # negative: no more hedges
    ctl = CallController(core, "/s.S/M", hedged, None)
    ctl.start()
    attempt = ctl.begin_attempt()
    assert ctl.end_hedge(attempt, AttemptOutcome(code=UNAVAILABLE))
    assert ctl.hedge_wait() == 0 and ctl.may_hedge()  # no pushback: the next hedge at once
    committed = ctl.begin_attempt()
    assert not ctl.end_hedge(committed, AttemptOutcome(code=UNAVAILABLE, committed=True))
