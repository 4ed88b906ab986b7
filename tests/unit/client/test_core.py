"""Pure decision core: backoff, breaker, budget, picker, endpoints, attempts."""

from __future__ import annotations

import grpc
import pytest
from rpcmesh.v1 import registry_pb2

from rpcmesh.client.attempts import AttemptOutcome, CallController, attempt_reached_server, parse_pushback
from rpcmesh.client.backoff import ExponentialBackoff, retry_delay
from rpcmesh.client.breaker import BreakerState, CircuitBreaker
from rpcmesh.client.budget import RetryBudget
from rpcmesh.client.endpoints import ServiceCore
from rpcmesh.client.picker import EndpointState, NoEndpointError, Picker
from rpcmesh.client.policy import (
    BreakerPolicy,
    HedgingPolicy,
    MethodPolicy,
    RetryBudgetPolicy,
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


def test_retry_delay_full_jitter_is_bounded_by_the_capped_exponential() -> None:
    assert retry_delay(1, initial=0.1, maximum=1.0, multiplier=2, rand=lambda: 0.999) == pytest.approx(0.0999)
    assert retry_delay(3, initial=0.1, maximum=1.0, multiplier=2, rand=lambda: 0.5) == pytest.approx(0.2)
    assert retry_delay(10, initial=0.1, maximum=1.0, multiplier=2, rand=lambda: 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="retry_number"):
        retry_delay(0, initial=0.1, maximum=1, multiplier=2)


def test_exponential_backoff_grows_caps_and_resets() -> None:
    backoff = ExponentialBackoff(initial=0.1, maximum=0.5, jitter=0.0)
    assert [round(backoff.next(), 3) for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next() == pytest.approx(0.1)


def test_breaker_opens_on_consecutive_failures_then_half_opens_and_closes_after_good_probes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(
        "b", BreakerPolicy(consecutive_failures=3, open_duration=2, half_open_probes=2), clock
    )
    for _ in range(2):
        breaker.record(failed=True)
    assert breaker.state is BreakerState.CLOSED
    breaker.record(failed=True)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.acquire()
    assert "circuit breaker 'b' is open (3 consecutive failures)" in breaker.describe()
    clock.now += 2
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.acquire() and breaker.acquire()
    assert not breaker.acquire()  # only two probes
    breaker.record(failed=False)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(failed=False)
    assert breaker.state is BreakerState.CLOSED


def test_breaker_reopens_when_a_probe_fails() -> None:
    clock = Clock()
    breaker = CircuitBreaker("b", BreakerPolicy(consecutive_failures=1, open_duration=1), clock)
    breaker.record(failed=True)
    clock.now += 1
    assert breaker.acquire()
    breaker.record(failed=True)
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot().reason == "probe failed"


def test_breaker_failure_rate_needs_minimum_calls() -> None:
    policy = BreakerPolicy(consecutive_failures=0, failure_rate=0.5, window=10, minimum_calls=4)
    breaker = CircuitBreaker("b", policy, Clock())
    breaker.record(failed=True)
    breaker.record(failed=False)
    breaker.record(failed=True)
    assert breaker.state is BreakerState.CLOSED  # 3 calls < minimum
    breaker.record(failed=False)
    assert breaker.state is BreakerState.OPEN  # 2/4 = 50 %
    assert breaker.snapshot().failure_rate == pytest.approx(0.5)


def test_breaker_sliding_window_forgets_old_calls() -> None:
    policy = BreakerPolicy(consecutive_failures=0, failure_rate=0.5, window=4, minimum_calls=4)
    breaker = CircuitBreaker("b", policy, Clock())
    for failed in (True, False, False, False, False, True, False):
        breaker.record(failed=failed)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot().calls_in_window == 4


def test_breaker_slow_call_rate() -> None:
    policy = BreakerPolicy(
        consecutive_failures=0, window=4, minimum_calls=2, slow_call_duration=0.5, slow_call_rate=1.0
    )
    breaker = CircuitBreaker("b", policy, Clock())
    breaker.record(failed=False, duration=0.6)
    breaker.record(failed=False, duration=0.7)
    assert breaker.state is BreakerState.OPEN
    assert "slow-call rate" in breaker.snapshot().reason


def test_retry_budget_drains_under_failure_and_refills_on_success() -> None:
    budget = RetryBudget(RetryBudgetPolicy(max_tokens=10, token_ratio=0.5))
    assert budget.allow_retry()
    for _ in range(5):
        budget.on_failure()
    assert not budget.allow_retry()  # 5 tokens is not more than half of 10
    budget.on_success()
    assert budget.allow_retry()
    assert budget.retries_denied == 1


def endpoints(*ids: str, zone: str = "") -> list[EndpointState]:
    return [EndpointState(instance_id=i, address=f"127.0.0.1:{n}", zone=zone) for n, i in enumerate(ids, 1)]


def test_round_robin_cycles_and_avoids_tried_and_failed_instances() -> None:
    picker = Picker("round_robin")
    pool = endpoints("a", "b", "c")
    assert sorted(picker.pick("s", pool).instance_id for _ in range(6)) == ["a", "a", "b", "b", "c", "c"]
    assert picker.pick("s", pool, exclude=["a", "b"]).instance_id == "c"
    assert picker.pick("s", pool, exclude=["a", "b", "c"]).instance_id in "abc"  # none left: any
    pool[0].connection_failed = True
    assert all(picker.pick("s", pool).instance_id != "a" for _ in range(6))


def test_least_request_prefers_the_less_loaded_of_two() -> None:
    values = iter([0.0, 0.0] * 10)
    picker = Picker("least_request", rand=lambda: next(values))
    pool = endpoints("a", "b")
    pool[0].outstanding = 5
    assert picker.pick("s", pool).instance_id == "b"


def test_zone_preference_falls_back_to_other_zones() -> None:
    picker = Picker("round_robin", prefer_zone="z1")
    pool = endpoints("a", "b") + endpoints("c", zone="z1")
    assert {picker.pick("s", pool).instance_id for _ in range(4)} == {"c"}
    assert picker.pick("s", pool[:2]).instance_id in "ab"


def test_breaker_ejection_is_capped_and_all_ejected_routes_to_all() -> None:
    clock = Clock()
    policy = BreakerPolicy(consecutive_failures=1)
    pool = endpoints("a", "b", "c", "d")
    for endpoint in pool:
        endpoint.breaker = CircuitBreaker(f"instance s/{endpoint.instance_id}", policy, clock)
    for endpoint in pool[:3]:
        endpoint.breaker.record(failed=True)  # type: ignore[union-attr]
    picker = Picker("round_robin", max_ejection_share=0.5)
    picked = {picker.pick("s", pool).instance_id for _ in range(8)}
    assert picked == {"c", "d"}  # a and b ejected (cap 2 of 4); c stays pickable despite its breaker
    single = endpoints("x")
    single[0].breaker = CircuitBreaker("instance s/x", policy, clock)
    single[0].breaker.record(failed=True)
    assert picker.pick("s", single).instance_id == "x"  # panic routing: a chance beats a certain error
    for endpoint in pool:
        endpoint.breaker.record(failed=True)  # type: ignore[union-attr]
    assert {picker.pick("s", pool).instance_id for _ in range(8)} == {"c", "d"}  # the cap holds
    share_one = Picker("round_robin", max_ejection_share=1.0)
    assert {share_one.pick("s", pool).instance_id for _ in range(8)} == {"a", "b", "c", "d"}
    with pytest.raises(NoEndpointError, match="no passing instance"):
        picker.pick("s", [])


def instance(iid: str, address: str = "", **kw: object) -> registry_pb2.Instance:
    return registry_pb2.Instance(service="s", instance_id=iid, address=address or f"h:{iid}", **kw)  # type: ignore[arg-type]


def put(inst: registry_pb2.Instance, rev: int) -> registry_pb2.WatchEvent:
    return registry_pb2.WatchEvent(type=registry_pb2.WATCH_EVENT_TYPE_PUT, instance=inst, revision=rev)


def test_service_core_applies_snapshot_and_events() -> None:
    core = ServiceCore("s", ServicePolicy())
    changes = core.apply(
        registry_pb2.WatchResponse(
            snapshot=True, revision=3, events=[put(instance("a"), 3), put(instance("b"), 3)]
        )
    )
    assert [e.instance_id for e in changes.added] == ["a", "b"] and core.synced and core.revision == 3
    delete = registry_pb2.WatchEvent(
        type=registry_pb2.WATCH_EVENT_TYPE_DELETE, instance=instance("a"), revision=4
    )
    changes = core.apply(registry_pb2.WatchResponse(revision=4, events=[delete]))
    assert [e.instance_id for e in changes.removed] == ["a"]
    critical = instance("b", health=registry_pb2.HEALTH_STATE_CRITICAL)
    health = registry_pb2.WatchEvent(type=registry_pb2.WATCH_EVENT_TYPE_HEALTH, instance=critical, revision=5)
    changes = core.apply(registry_pb2.WatchResponse(revision=5, events=[health]))
    assert [e.instance_id for e in changes.removed] == ["b"] and core.endpoints() == []
    changes = core.apply(registry_pb2.WatchResponse(revision=6, events=[put(instance("b"), 6)]))
    assert [e.instance_id for e in changes.added] == ["b"]
    moved = core.apply(registry_pb2.WatchResponse(revision=7, events=[put(instance("b", "h:new"), 7)]))
    assert [e.address for e in moved.removed] == ["h:b"] and [e.address for e in moved.added] == ["h:new"]
    resync = core.apply(registry_pb2.WatchResponse(snapshot=True, revision=9, events=[put(instance("c"), 9)]))
    assert [e.instance_id for e in resync.removed] == ["b"] and [e.instance_id for e in resync.added] == ["c"]


def controller(method: MethodPolicy, *, deadline: float | None = None, budget: float = 100) -> CallController:
    core = ServiceCore(
        "s",
        ServicePolicy(method=method, retry_budget=RetryBudgetPolicy(max_tokens=budget)),
        clock=Clock(),
        rand=lambda: 0.5,
    )
    events = [put(instance(i), 1) for i in "abc"]
    core.apply(registry_pb2.WatchResponse(snapshot=True, revision=1, events=events))
    ctl = CallController(core, "/s.S/M", method, deadline, rand=lambda: 0.5)
    ctl.start()
    return ctl


def test_idempotent_call_retries_on_another_instance_up_to_max_attempts() -> None:
    ctl = controller(MethodPolicy(idempotent=True, retry=RetryPolicy(max_attempts=3, initial_backoff=0.1)))
    first = ctl.begin_attempt()
    assert ctl.end_attempt(first, AttemptOutcome(code=UNAVAILABLE)) == pytest.approx(0.05)
    second = ctl.begin_attempt()
    assert second.endpoint.instance_id != first.endpoint.instance_id
    assert ctl.end_attempt(second, AttemptOutcome(code=UNAVAILABLE)) == pytest.approx(0.1)
    third = ctl.begin_attempt()
    assert {a.endpoint.instance_id for a in (first, second, third)} == {"a", "b", "c"}
    assert ctl.end_attempt(third, AttemptOutcome(code=UNAVAILABLE)) is None  # 3 attempts used


def test_non_retryable_code_and_committed_stream_stop() -> None:
    ctl = controller(MethodPolicy(idempotent=True))
    assert ctl.end_attempt(ctl.begin_attempt(), AttemptOutcome(code=grpc.StatusCode.INVALID_ARGUMENT)) is None
    ctl = controller(MethodPolicy(idempotent=True))
    assert ctl.end_attempt(ctl.begin_attempt(), AttemptOutcome(code=UNAVAILABLE, committed=True)) is None


def test_non_idempotent_call_retries_only_when_it_never_reached_a_server() -> None:
    ctl = controller(MethodPolicy(idempotent=False))
    assert ctl.end_attempt(ctl.begin_attempt(), AttemptOutcome(code=UNAVAILABLE, reached_server=True)) is None
    ctl = controller(MethodPolicy(idempotent=False))
    attempt = ctl.begin_attempt()
    assert ctl.end_attempt(attempt, AttemptOutcome(code=UNAVAILABLE, reached_server=False)) is not None
    assert attempt.endpoint.connection_failed


def test_pushback_overrides_backoff_and_negative_forbids_retry() -> None:
    ctl = controller(MethodPolicy(idempotent=True))
    assert ctl.end_attempt(ctl.begin_attempt(), AttemptOutcome(code=UNAVAILABLE, pushback_ms=300)) == 0.3
    ctl = controller(MethodPolicy(idempotent=True))
    assert ctl.end_attempt(ctl.begin_attempt(), AttemptOutcome(code=UNAVAILABLE, pushback_ms=-1)) is None


def test_retry_that_would_end_after_the_deadline_is_not_made() -> None:
    ctl = controller(MethodPolicy(idempotent=True), deadline=100.0 + 0.01)
    assert ctl.end_attempt(ctl.begin_attempt(), AttemptOutcome(code=UNAVAILABLE, pushback_ms=50)) is None


def test_budget_limits_attempts_per_call_under_total_failure() -> None:
    ctl = controller(MethodPolicy(idempotent=True), budget=10)
    core = ctl.core
    attempts = calls = 0
    for _ in range(200):
        ctl = CallController(core, "/s.S/M", ctl.policy, None, rand=lambda: 0.0)
        calls += 1
        while True:
            attempts += 1
            if ctl.end_attempt(ctl.begin_attempt(), AttemptOutcome(code=UNAVAILABLE)) is None:
                break
    assert attempts / calls <= 1.1


def test_hedging_decisions() -> None:
    ctl = controller(MethodPolicy(idempotent=True, hedging=HedgingPolicy(max_attempts=2)))
    assert ctl.policy.retry is None
    first = ctl.begin_attempt()
    clock = ctl.core.clock
    assert isinstance(clock, Clock)
    assert not ctl.may_hedge()  # not due before the hedging delay
    clock.now += 0.05
    assert ctl.may_hedge()
    second = ctl.begin_attempt()
    assert not ctl.may_hedge()  # max attempts
    assert ctl.end_hedge(first, AttemptOutcome(code=UNAVAILABLE))  # non-fatal
    assert not ctl.end_hedge(second, AttemptOutcome(code=grpc.StatusCode.INVALID_ARGUMENT))


def test_attempt_reached_server_and_pushback_parsing() -> None:
    assert not attempt_reached_server(UNAVAILABLE, "failed to connect to all addresses; last error: ...")
    assert attempt_reached_server(UNAVAILABLE, "Socket closed")
    assert attempt_reached_server(grpc.StatusCode.INTERNAL, "failed to connect to all addresses")
    assert parse_pushback((("grpc-retry-pushback-ms", "250"),)) == 250
    assert parse_pushback((("grpc-retry-pushback-ms", "soon"),)) == -1
    assert parse_pushback(()) is None


def test_calls_that_reach_no_instance_do_not_open_the_service_breaker() -> None:
    clock = Clock()
    core = ServiceCore(
        "s",
        ServicePolicy(
            instance_breaker=BreakerPolicy(consecutive_failures=1, open_duration=5),
            service_breaker=BreakerPolicy(consecutive_failures=3, open_duration=5),
        ),
        clock=clock,
    )
    core.apply(registry_pb2.WatchResponse(snapshot=True, revision=1, events=[put(instance("a"), 1)]))
    method = MethodPolicy(retry=None)
    first = CallController(core, "/s.S/M", method, None)
    first.start()
    endpoint = first.begin_attempt()
    first.end_attempt(endpoint, AttemptOutcome(code=UNAVAILABLE, duration=0.01, reached_server=True))
    first.finish(UNAVAILABLE)  # a real failure: counted by both breakers
    core.apply(registry_pb2.WatchResponse(snapshot=True, revision=2, events=[]))
    for _ in range(10):  # no instance left: none of these reaches one
        ctl = CallController(core, "/s.S/M", method, None)
        ctl.start()
        with pytest.raises(NoEndpointError):
            ctl.begin_attempt()
        ctl.finish(UNAVAILABLE)
    assert core.breaker is not None and core.breaker.state is BreakerState.CLOSED
