"""The breaker's transition listener and the breaker names a refusal carries (pure, no I/O)."""

from __future__ import annotations

import pytest

from rpcmesh.client.breaker import CircuitBreaker
from rpcmesh.client.endpoints import ServiceCore
from rpcmesh.client.picker import NoEndpointError
from rpcmesh.client.policy import BreakerPolicy, ServicePolicy


def test_listener_hears_every_transition() -> None:
    now = [0.0]
    heard: list[tuple[str, str, str]] = []
    breaker = CircuitBreaker(
        "service echo",
        BreakerPolicy(consecutive_failures=2, open_duration=5.0, half_open_probes=1),
        lambda: now[0],
        on_transition=lambda *change: heard.append(change),
    )
    breaker.record(failed=True)
    breaker.record(failed=True)
    assert not breaker.acquire()
    now[0] = 6.0
    assert breaker.acquire()
    breaker.record(failed=False)
    assert heard == [
        ("service echo", "closed", "open"),
        ("service echo", "open", "half_open"),
        ("service echo", "half_open", "closed"),
    ]


def test_refusal_names_the_breaker() -> None:
    heard: list[tuple[str, str, str]] = []
    core = ServiceCore(
        "echo",
        ServicePolicy(service_breaker=BreakerPolicy(consecutive_failures=1, open_duration=60.0)),
        on_breaker_transition=lambda *change: heard.append(change),
    )
    assert core.breaker is not None
    core.admit_call()
    core.breaker.record(failed=True)
    with pytest.raises(NoEndpointError) as refused:
        core.admit_call()
    assert refused.value.breakers == ("service echo",)
    assert heard == [("service echo", "closed", "open")]
