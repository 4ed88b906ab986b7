from __future__ import annotations

import grpc

from rpcmesh.telemetry import (
    DISABLED,
    MeshMetrics,
    attempt_span,
    record_attempt,
    record_breaker_rejection,
    record_breaker_transition,
)
from tests.unit.telemetry.conftest import Recorded


def test_attempts_and_rejections_are_events_on_the_call_span(recorded: Recorded) -> None:
    telemetry = recorded.telemetry
    with telemetry.tracer.start_as_current_span("echo.v1.Echo/Echo"):
        record_attempt(1, service="echo.v1.Echo", method="Echo", peer="10.0.0.1:1", telemetry=telemetry)
        record_attempt(
            2,
            service="echo.v1.Echo",
            method="Echo",
            backoff_s=0.05,
            reason="UNAVAILABLE",
            telemetry=telemetry,
        )
        record_attempt(3, service="echo.v1.Echo", method="Echo", hedge=True, telemetry=telemetry)
        record_breaker_rejection("echo.v1.Echo@10.0.0.1:1", telemetry=telemetry)
        record_breaker_transition("echo.v1.Echo@10.0.0.1:1", "closed", "open", telemetry=telemetry)
    (span,) = recorded.spans.get_finished_spans()
    assert [e.name for e in span.events] == [
        "rpcmesh.attempt",
        "rpcmesh.attempt",
        "rpcmesh.attempt",
        "rpcmesh.breaker.rejected",
        "rpcmesh.breaker.transition",
    ]
    assert span.events[1].attributes["rpcmesh.retry_reason"] == "UNAVAILABLE"
    assert span.events[2].attributes["rpcmesh.hedge"] is True
    assert recorded.metric_points("rpcmesh.client.retries")[0][1] == 1
    assert recorded.metric_points("rpcmesh.client.hedges")[0][1] == 1
    assert recorded.metric_points("rpcmesh.breaker.rejections")[0][1] == 1
    assert recorded.metric_points("rpcmesh.breaker.state") == [
        ({"rpcmesh.breaker": "echo.v1.Echo@10.0.0.1:1"}, 2)
    ]


def test_attempt_span_is_a_child_of_the_call(recorded: Recorded) -> None:
    telemetry = recorded.telemetry
    with (
        telemetry.tracer.start_as_current_span("call") as call,
        attempt_span(2, service="s", method="m", peer="p:1", telemetry=telemetry),
    ):
        pass
    attempt = next(s for s in recorded.spans.get_finished_spans() if s.name == "s/m attempt 2")
    assert attempt.parent is not None and attempt.parent.span_id == call.get_span_context().span_id


def test_everything_is_a_no_op_when_off() -> None:
    record_attempt(2, service="s", method="m", telemetry=DISABLED)
    record_breaker_rejection("b", telemetry=DISABLED)
    record_breaker_transition("b", "closed", "open", telemetry=DISABLED)
    with attempt_span(2, service="s", method="m", telemetry=DISABLED) as span:
        assert not span.is_recording()
    assert type(DISABLED.metrics) is MeshMetrics
    assert not DISABLED.tracing


def test_component_metrics(recorded: Recorded) -> None:
    metrics = recorded.telemetry.metrics
    metrics.client_call("echo.v1.Echo", "Echo", grpc.StatusCode.OK, 0.002)
    metrics.server_call("echo.v1.Echo", "Echo", grpc.StatusCode.NOT_FOUND, 0.001)
    metrics.bus_published("orders", 3)
    metrics.bus_delivered("orders", "billing")
    metrics.bus_redelivered("orders", "billing")
    metrics.bus_dead_lettered("orders", "billing", "max_deliveries")
    metrics.set_consumer_lag("orders", "billing", 17)
    metrics.saga_finished("place-order", "compensated", 1.5)
    metrics.set_registry_instances("echo", "passing", 3)
    metrics.set_registry_instances("echo", "critical", 1)
    ((attrs, count),) = recorded.metric_points("rpc.client.call.duration")
    assert count == 1 and attrs["rpc.grpc.status_code"] == 0 and attrs["rpc.method"] == "Echo"
    assert recorded.metric_points("rpc.server.call.duration")[0][0]["rpc.grpc.status_code"] == 5
    assert recorded.metric_points("rpcmesh.bus.published")[0][1] == 3
    assert recorded.metric_points("rpcmesh.bus.dead_lettered")[0][0]["reason"] == "max_deliveries"
    assert recorded.metric_points("rpcmesh.bus.consumer_lag")[0][1] == 17
    assert recorded.metric_points("rpcmesh.saga.outcomes")[0][0]["rpcmesh.saga.outcome"] == "compensated"
    assert sorted(v for _, v in recorded.metric_points("rpcmesh.registry.instances")) == [1, 3]  # type: ignore[type-var]
