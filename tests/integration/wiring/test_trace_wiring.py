"""Telemetry wired end to end: Mesh client → ServiceHost A → ServiceHost B, and through the gateway.

Every process exports OTLP to a real collector (``tests/support/otlp_collector.py``):
`rpcmesh up`, the hosts and the gateway from their ``OTEL_*`` variables, this test's
Mesh from its own telemetry handle. Checked: one trace id across every hop with the
right parents, a retry as two attempt spans, the correlation id on every span and in
the hosts' log lines, a breaker rejection as a span event, and client-call and
registry instance-count metrics at the collector.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc

from rpcmesh.client import (
    BreakerPolicy,
    HedgingPolicy,
    Mesh,
    MeshPolicy,
    MethodPolicy,
    ServicePolicy,
    SyncMesh,
)
from rpcmesh.telemetry import (
    DISABLED,
    Telemetry,
    TelemetryConfig,
    aio_client_interceptors,
    setup_telemetry,
    use_correlation_id,
)
from tests.integration.wiring.conftest import Processes
from tests.support.otlp_collector import CollectedSpan, OtlpCollector, running_collector

pytestmark = pytest.mark.slow

CHAIN_HOST = str(Path(__file__).with_name("chain_host.py"))
TIMEOUT = 10.0


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    with running_collector() as started:
        yield started


@pytest.fixture
def client_telemetry(collector: OtlpCollector) -> Iterator[Telemetry]:
    telemetry = setup_telemetry(
        TelemetryConfig(
            service_name="client",
            traces_exporters=("otlp",),
            metrics_exporters=("otlp",),
            otlp_traces_endpoint=collector.endpoint,
            otlp_metrics_endpoint=collector.endpoint,
            metric_export_interval_s=0.2,
        ),
        install=False,
        simple_span_processor=True,
    )
    try:
        yield telemetry
    finally:
        telemetry.shutdown()


def _otel(collector: OtlpCollector, name: str) -> dict[str, str]:
    return {
        "OTEL_SERVICE_NAME": name,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
    }


def _chain_host(processes: Processes, collector: OtlpCollector, registry: str, name: str, *args: str) -> None:
    processes.start(
        [sys.executable, CHAIN_HOST, "--registry", registry, "--name", name, *args], _otel(collector, name)
    )


def _of(spans: list[CollectedSpan], service: str, kind: str) -> list[CollectedSpan]:
    return [s for s in spans if s.service == service and s.kind == kind]


def _trace_of(spans: list[CollectedSpan], service: str, kind: str, count: int) -> list[CollectedSpan] | None:
    """The spans of the trace holding ``service``'s ``kind`` span, once it has ``count`` spans."""
    anchor = _of(spans, service, kind)
    if not anchor:
        return None
    trace = [s for s in spans if s.trace_id == anchor[0].trace_id]
    return trace if len(trace) >= count else None


async def test_client_to_a_to_b_with_retry_is_one_trace(
    processes: Processes, collector: OtlpCollector, client_telemetry: Telemetry
) -> None:
    registry = processes.control_plane(env=_otel(collector, "controlplane"))
    _chain_host(processes, collector, registry, "svc-b")
    _chain_host(processes, collector, registry, "svc-a", "--downstream", "svc-b", "--fail-first", "1")

    policy = MeshPolicy(default=ServicePolicy(method=MethodPolicy(idempotent=True)))
    async with Mesh(registry, policy=policy, telemetry=client_telemetry) as mesh:
        await mesh.wait_for_instances("svc-a", 1, within=20)
        reply = await echo_pb2_grpc.EchoStub(mesh.channel("svc-a")).Echo(
            echo_pb2.EchoRequest(message="x"), timeout=TIMEOUT
        )
    correlation = reply.message
    assert reply.instance_id == "svc-a-1" and correlation

    # client: call + 2 attempts; A: 2 server spans, its mesh call + 1 attempt; B: 1 server span.
    trace: list[CollectedSpan] = []

    def complete(spans: list[CollectedSpan]) -> bool:
        nonlocal trace
        trace = _trace_of(spans, "svc-b", "SERVER", 8) or []
        return bool(trace)

    collector.wait_for_spans(complete)
    assert len({s.trace_id for s in trace}) == 1
    for span in trace:
        assert span.attributes["rpcmesh.correlation_id"] == correlation, span

    (call,) = _of(trace, "client", "INTERNAL")
    attempts = _of(trace, "client", "CLIENT")
    assert call.parent_span_id is None
    assert call.name == "echo.v1.Echo/Echo" and call.attributes["rpc.grpc.status_code"] == 0
    assert call.events.count("rpcmesh.attempt") == 2
    assert len(attempts) == 2 and {a.parent_span_id for a in attempts} == {call.span_id}
    assert sorted(a.attributes["rpc.grpc.status_code"] for a in attempts) == [0, 14]

    a_servers = _of(trace, "svc-a", "SERVER")
    assert sorted(s.parent_span_id or "" for s in a_servers) == sorted(a.span_id for a in attempts)
    (a_ok,) = [s for s in a_servers if s.attributes["rpc.grpc.status_code"] == 0]
    (a_call,) = _of(trace, "svc-a", "INTERNAL")
    (a_attempt,) = _of(trace, "svc-a", "CLIENT")
    (b_server,) = _of(trace, "svc-b", "SERVER")
    assert a_call.parent_span_id == a_ok.span_id
    assert a_attempt.parent_span_id == a_call.span_id
    assert b_server.parent_span_id == a_attempt.span_id

    # The hosts' log lines carry the same correlation id.
    for proc in processes.started[1:]:
        proc.wait_for_line(f"correlation={correlation} handling call", timeout=10)

    # Metrics: client calls and retries from this process, instance counts from the Registry.
    assert collector.wait_for_metric("client", "rpc.client.call.duration").points
    assert collector.wait_for_metric("client", "rpcmesh.client.retries").points

    def instances_reported(spans: list[CollectedSpan]) -> bool:
        return any(
            m.service == "controlplane"
            and m.name == "rpcmesh.registry.instances"
            and any(
                p.get("rpcmesh.service") == "svc-a" and p.get("rpcmesh.health") == "passing" for p in m.points
            )
            for m in collector.metrics
        )

    collector.wait_for_spans(instances_reported)


async def test_breaker_rejection_is_a_span_event(
    processes: Processes, collector: OtlpCollector, client_telemetry: Telemetry
) -> None:
    registry = processes.control_plane()
    _chain_host(processes, collector, registry, "svc-b")
    policy = MeshPolicy(
        default=ServicePolicy(
            method=MethodPolicy(retry=None),
            instance_breaker=None,
            service_breaker=BreakerPolicy(consecutive_failures=1, open_duration=60.0),
        )
    )
    failing = echo_pb2.EchoRequest(message="x", behaviour=echo_pb2.Behaviour(fail_code=14))
    async with Mesh(registry, policy=policy, telemetry=client_telemetry) as mesh:
        await mesh.wait_for_instances("svc-b", 1, within=20)
        stub = echo_pb2_grpc.EchoStub(mesh.channel("svc-b"))
        for _ in range(2):  # the first fails at the server and opens the breaker; the second is refused
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Echo(failing, timeout=TIMEOUT)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    def rejected(spans: list[CollectedSpan]) -> bool:
        return any("rpcmesh.breaker.rejected" in s.events for s in _of(spans, "client", "INTERNAL"))

    spans = collector.wait_for_spans(rejected)
    calls = _of(spans, "client", "INTERNAL")
    assert any("rpcmesh.breaker.transition" in s.events for s in calls)
    (refused,) = [s for s in calls if "rpcmesh.breaker.rejected" in s.events]
    assert refused.status_code == 2  # ERROR
    assert not [s for s in spans if s.trace_id == refused.trace_id and s.kind == "CLIENT"]  # nothing was sent
    rejections = collector.wait_for_metric("client", "rpcmesh.breaker.rejections")
    assert rejections.points


async def test_gateway_continues_the_trace(
    processes: Processes, collector: OtlpCollector, client_telemetry: Telemetry
) -> None:
    registry = processes.control_plane()
    _chain_host(processes, collector, registry, "svc-b")
    gateway = processes.gateway(registry, _otel(collector, "gateway"), "--route", "echo.v1.Echo=svc-b")

    async with grpc.aio.insecure_channel(
        gateway, interceptors=aio_client_interceptors(client_telemetry, target=gateway)
    ) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(message="x"), timeout=TIMEOUT)
    correlation = reply.message

    trace: list[CollectedSpan] = []

    def complete(spans: list[CollectedSpan]) -> bool:
        nonlocal trace
        # The gateway also learns the method's shape by server reflection (spans of their own).
        echo_spans = [s for s in spans if s.name == "echo.v1.Echo/Echo"]
        trace = _trace_of(echo_spans, "svc-b", "SERVER", 5) or []
        return bool(trace)

    collector.wait_for_spans(complete)
    (client,) = _of(trace, "client", "CLIENT")
    (gw_server,) = _of(trace, "gateway", "SERVER")
    (gw_call,) = _of(trace, "gateway", "INTERNAL")
    (gw_attempt,) = _of(trace, "gateway", "CLIENT")
    (b_server,) = _of(trace, "svc-b", "SERVER")
    assert client.parent_span_id is None
    assert gw_server.parent_span_id == client.span_id
    assert gw_call.parent_span_id == gw_server.span_id
    assert gw_attempt.parent_span_id == gw_call.span_id
    assert b_server.parent_span_id == gw_attempt.span_id
    for span in trace:
        assert span.attributes["rpcmesh.correlation_id"] == correlation


async def test_correlation_id_travels_with_telemetry_off(processes: Processes) -> None:
    """No exporter anywhere: no span work, but the caller's correlation id still reaches the handler."""
    registry = processes.control_plane()
    processes.start(
        [sys.executable, CHAIN_HOST, "--registry", registry, "--name", "svc-b"],
        {"OTEL_SDK_DISABLED": "false"},
    )
    async with Mesh(registry, telemetry=DISABLED) as mesh:
        await mesh.wait_for_instances("svc-b", 1, within=20)
        stub = echo_pb2_grpc.EchoStub(mesh.channel("svc-b"))
        with use_correlation_id("order-42"):
            reply = await stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=TIMEOUT)
        assert reply.message == "order-42"
        # Without one, the first hop (the host) makes one up.
        reply = await stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=TIMEOUT)
        assert reply.message and reply.message != "order-42"
    processes.started[-1].wait_for_line("correlation=order-42 handling call", timeout=10)
    # A plaintext host says so loudly.
    assert "WARNING: rpcmesh is serving PLAINTEXT" in processes.started[-1].output()


async def test_sync_mesh_traces_each_attempt(
    processes: Processes, collector: OtlpCollector, client_telemetry: Telemetry
) -> None:
    registry = processes.control_plane()
    _chain_host(processes, collector, registry, "svc-b")

    def call() -> str:
        with SyncMesh(registry, telemetry=client_telemetry) as mesh:
            mesh.wait_for_instances("svc-b", 1, within=20)
            stub = echo_pb2_grpc.EchoStub(mesh.channel("svc-b"))
            return str(stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=TIMEOUT).message)

    correlation = await asyncio.to_thread(call)
    trace: list[CollectedSpan] = []

    def complete(spans: list[CollectedSpan]) -> bool:
        nonlocal trace
        trace = _trace_of(spans, "svc-b", "SERVER", 3) or []
        return bool(trace)

    collector.wait_for_spans(complete)
    (call_span,) = _of(trace, "client", "INTERNAL")
    (attempt,) = _of(trace, "client", "CLIENT")
    (server,) = _of(trace, "svc-b", "SERVER")
    assert call_span.parent_span_id is None
    assert attempt.parent_span_id == call_span.span_id
    assert server.parent_span_id == attempt.span_id
    assert {s.attributes["rpcmesh.correlation_id"] for s in trace} == {correlation}


async def test_hedged_attempts_are_spans_of_one_call(
    processes: Processes, collector: OtlpCollector, client_telemetry: Telemetry
) -> None:
    registry = processes.control_plane()
    _chain_host(processes, collector, registry, "svc-b")
    policy = MeshPolicy(
        default=ServicePolicy(
            method=MethodPolicy(
                idempotent=True, retry=None, hedging=HedgingPolicy(max_attempts=2, delay=0.05)
            )
        )
    )
    slow = echo_pb2.EchoRequest(message="x", behaviour=echo_pb2.Behaviour(delay_ms=400))
    async with Mesh(registry, policy=policy, telemetry=client_telemetry) as mesh:
        await mesh.wait_for_instances("svc-b", 1, within=20)
        await echo_pb2_grpc.EchoStub(mesh.channel("svc-b")).Echo(slow, timeout=TIMEOUT)

    trace: list[CollectedSpan] = []

    def complete(spans: list[CollectedSpan]) -> bool:
        nonlocal trace
        calls = _of(spans, "client", "INTERNAL")
        trace = [s for s in spans if calls and s.trace_id == calls[0].trace_id and s.service == "client"]
        return len(trace) >= 3

    collector.wait_for_spans(complete)
    (call,) = _of(trace, "client", "INTERNAL")
    attempts = _of(trace, "client", "CLIENT")
    assert call.events.count("rpcmesh.attempt") == 2
    assert len(attempts) == 2 and {a.parent_span_id for a in attempts} == {call.span_id}
    assert collector.wait_for_metric("client", "rpcmesh.client.hedges").points
