"""Policies in code and from YAML/TOML files: defaults, merging, validation messages."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from rpcmesh.client.context import deadline_scope, effective_deadline
from rpcmesh.client.policy import (
    BreakerPolicy,
    HedgingPolicy,
    MeshPolicy,
    MethodPolicy,
    PolicyError,
    RetryPolicy,
    ServicePolicy,
)
from rpcmesh.client.policy_file import EXAMPLE_YAML, load_policy, parse_policy


def test_defaults_are_sane() -> None:
    policy = MeshPolicy().for_service("any").for_method("/a.B/C")
    assert policy.retry is not None and policy.retry.max_attempts == 3
    assert policy.retry.retryable_codes == {grpc.StatusCode.UNAVAILABLE}
    assert not policy.idempotent and policy.hedging is None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RetryPolicy(max_attempts=6), "max_attempts: must be an integer from 2 to 5"),
        (lambda: RetryPolicy(initial_backoff=0), "initial_backoff: must be a positive"),
        (
            lambda: RetryPolicy(retryable_codes=frozenset({"NOPE"})),
            "retryable_codes: unknown status code 'NOPE'",
        ),
        (lambda: RetryPolicy(retryable_codes=frozenset({"OK"})), "retryable_codes: OK is not a failure code"),
        (lambda: MethodPolicy(hedging=HedgingPolicy()), "hedging: only idempotent methods"),
        (
            lambda: BreakerPolicy(minimum_calls=50, window=20),
            "minimum_calls: must be an integer from 1 to window",
        ),
        (lambda: ServicePolicy(load_balancing="random"), "load_balancing: must be"),  # type: ignore[arg-type]
    ],
)
def test_invalid_policies_name_the_field(build: object, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        build()  # type: ignore[operator]


def test_method_lookup_by_name_or_path() -> None:
    slow = MethodPolicy(timeout=9)
    service = ServicePolicy(methods={"Echo": slow, "/echo.v1.Echo/Chat": MethodPolicy(timeout=1)})
    assert service.for_method("/echo.v1.Echo/Echo") is slow
    assert service.for_method("/echo.v1.Echo/Chat").timeout == 1
    assert service.for_method("/echo.v1.Echo/Other") is service.method


def test_yaml_example_merges_levels() -> None:
    import yaml

    policy = parse_policy(yaml.safe_load(EXAMPLE_YAML))
    echo = policy.for_service("echo")
    assert echo.method.idempotent and echo.method.timeout == 5.0
    hedged = echo.for_method("/echo.v1.Echo/Echo")
    assert (
        hedged.hedging is not None and hedged.hedging.delay == pytest.approx(0.02) and hedged.timeout == 5.0
    )
    assert policy.for_service("other").method.idempotent is False


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        """
[defaults]
load_balancing = "least_request"
service_breaker = false
[defaults.method]
timeout = "250ms"
[services.orders.method]
idempotent = true
retry = { max_attempts = 5, retryable_codes = ["UNAVAILABLE", "RESOURCE_EXHAUSTED"] }
"""
    )
    policy = load_policy(path)
    orders = policy.for_service("orders")
    assert orders.load_balancing == "least_request" and orders.service_breaker is None
    assert orders.method.timeout == pytest.approx(0.25)
    assert orders.method.retry is not None and orders.method.retry.max_attempts == 5
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in orders.method.retry.retryable_codes


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"services": {"echo": {"method": {"retry": {"max_attempts": 9}}}}},
            "services.echo.method.retry.max_attempts",
        ),
        ({"defaults": {"method": {"timeout": "soon"}}}, "defaults.method.timeout: expected a duration"),
        ({"defaults": {"colour": "red"}}, "defaults.colour: unknown setting"),
        ({"servces": {}}, "servces: unknown section"),
        (
            {"services": {"e": {"methods": {"M": {"retry": {"foo": 1}}}}}},
            "services.e.methods.M.retry.foo: unknown",
        ),
    ],
)
def test_file_errors_name_the_path(data: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(data)


def test_effective_deadline_takes_the_earliest_and_the_caller_bounds_it() -> None:
    assert effective_deadline(None, None, 10.0) is None
    assert effective_deadline(None, 5.0, 10.0) == 15.0
    assert effective_deadline(2.0, 5.0, 10.0) == 12.0  # an explicit timeout replaces the policy default
    with deadline_scope(1.0) as scope:
        assert scope.deadline is not None
        assert effective_deadline(60.0, None, time.monotonic()) == scope.deadline
        with deadline_scope(30.0) as inner:
            assert inner.deadline == scope.deadline  # an inner scope cannot extend the outer one
