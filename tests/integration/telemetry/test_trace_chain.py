"""client → service A → service B over real gRPC, every process exporting OTLP to a real collector."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc

from rpcmesh.telemetry import (
    Telemetry,
    TelemetryConfig,
    aio_client_interceptors,
    setup_telemetry,
    sync_client_interceptors,
    use_correlation_id,
)
from tests.integration.telemetry.conftest import StartRelay
from tests.support.otlp_collector import CollectedSpan, OtlpCollector

pytestmark = pytest.mark.slow


@pytest.fixture
def client_telemetry(collector: OtlpCollector) -> Iterator[Telemetry]:
    telemetry = setup_telemetry(
        TelemetryConfig(
            service_name="client",
            traces_exporters=("otlp",),
            otlp_traces_endpoint=collector.endpoint,
        ),
        install=False,
        simple_span_processor=True,
    )
    try:
        yield telemetry
    finally:
        telemetry.shutdown()


def _trace(spans: list[CollectedSpan], trace_id: str) -> list[CollectedSpan]:
    return [s for s in spans if s.trace_id == trace_id]


def _one(spans: list[CollectedSpan], service: str, kind: str) -> CollectedSpan:
    (span,) = [s for s in spans if s.service == service and s.kind == kind]
    return span


def _assert_chain(spans: list[CollectedSpan], method: str, correlation: str) -> None:
    client = _one(spans, "client", "CLIENT")
    a_server = _one(spans, "service-a", "SERVER")
    a_client = _one(spans, "service-a", "CLIENT")
    b_server = _one(spans, "service-b", "SERVER")
    assert {s.trace_id for s in (client, a_server, a_client, b_server)} == {client.trace_id}
    assert client.parent_span_id is None
    assert a_server.parent_span_id == client.span_id
    assert a_client.parent_span_id == a_server.span_id
    assert b_server.parent_span_id == a_client.span_id
    for span in (client, a_server, a_client, b_server):
        assert span.name == f"echo.v1.Echo/{method}"
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == "echo.v1.Echo"
        assert span.attributes["rpc.method"] == method
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.attributes["rpcmesh.correlation_id"] == correlation
    assert client.attributes["server.address"] == "127.0.0.1"
    assert a_server.attributes["network.peer.address"] == "127.0.0.1"


async def test_unary_chain_is_one_trace_with_one_correlation_id(
    collector: OtlpCollector, start_relay: StartRelay, client_telemetry: Telemetry
) -> None:
    b = start_relay("service-b")
    a = start_relay("service-a", downstream=b)
    async with grpc.aio.insecure_channel(
        a, interceptors=aio_client_interceptors(client_telemetry, target=a)
    ) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        # No correlation id: the client (first hop) makes one, and B's handler sees it.
        reply = await stub.Echo(echo_pb2.EchoRequest(message="hello"), timeout=20)
        created = reply.message
        # A correlation id given by the caller is kept all the way.
        with use_correlation_id("order-4711"):
            given = await stub.Echo(echo_pb2.EchoRequest(message="again"), timeout=20)
    assert len(created) == 32
    assert given.message == "order-4711"

    def chain_for(correlation: str) -> list[CollectedSpan]:
        return [s for s in collector.spans if s.attributes.get("rpcmesh.correlation_id") == correlation]

    for correlation in (created, "order-4711"):
        await asyncio.to_thread(
            collector.wait_for_spans, lambda _spans, c=correlation: len(chain_for(c)) >= 4
        )
        spans = chain_for(correlation)
        assert len(spans) == 4
        _assert_chain(_trace(collector.spans, spans[0].trace_id), "Echo", correlation)
    # Server metrics went out over OTLP too.
    metric = await asyncio.to_thread(collector.wait_for_metric, "service-b", "rpc.server.call.duration")
    assert any(point.get("rpc.method") == "Echo" for point in metric.points)


async def test_server_streaming_chain(
    collector: OtlpCollector, start_relay: StartRelay, client_telemetry: Telemetry
) -> None:
    b = start_relay("service-b")
    a = start_relay("service-a", downstream=b)
    async with grpc.aio.insecure_channel(
        a, interceptors=aio_client_interceptors(client_telemetry, target=a)
    ) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        with use_correlation_id("stream-1"):
            replies = [r.message async for r in stub.Expand(echo_pb2.ExpandRequest(message="x", repeat=3))]
    assert replies == ["stream-1"] * 3
    spans = await asyncio.to_thread(
        collector.wait_for_spans,
        lambda all_spans: (
            len([s for s in all_spans if s.attributes.get("rpcmesh.correlation_id") == "stream-1"]) >= 4
        ),
    )
    _assert_chain(
        [s for s in spans if s.attributes.get("rpcmesh.correlation_id") == "stream-1"], "Expand", "stream-1"
    )


def test_sync_client_continues_into_async_services(
    collector: OtlpCollector, start_relay: StartRelay, client_telemetry: Telemetry
) -> None:
    b = start_relay("service-b")
    a = start_relay("service-a", downstream=b)
    with grpc.insecure_channel(a) as raw:
        channel = grpc.intercept_channel(raw, *sync_client_interceptors(client_telemetry, target=a))
        stub = echo_pb2_grpc.EchoStub(channel)
        with use_correlation_id("sync-1"):
            reply = stub.Echo(echo_pb2.EchoRequest(message="s"), timeout=20)
    assert reply.message == "sync-1"
    spans = collector.wait_for_spans(
        lambda all_spans: (
            len([s for s in all_spans if s.attributes.get("rpcmesh.correlation_id") == "sync-1"]) >= 4
        )
    )
    _assert_chain(
        [s for s in spans if s.attributes.get("rpcmesh.correlation_id") == "sync-1"], "Echo", "sync-1"
    )


async def test_failed_call_marks_client_span_error(
    collector: OtlpCollector, start_relay: StartRelay, client_telemetry: Telemetry
) -> None:
    b = start_relay("service-b")
    async with grpc.aio.insecure_channel(
        b, interceptors=aio_client_interceptors(client_telemetry, target=b)
    ) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        with use_correlation_id("fail-1"), pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Expand(
                echo_pb2.ExpandRequest(message="x", repeat=1, behaviour=echo_pb2.Behaviour(fail_code=8))
            ).read()
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    spans = await asyncio.to_thread(
        collector.wait_for_spans,
        lambda all_spans: (
            len([s for s in all_spans if s.attributes.get("rpcmesh.correlation_id") == "fail-1"]) >= 2
        ),
    )
    mine = [s for s in spans if s.attributes.get("rpcmesh.correlation_id") == "fail-1"]
    client = _one(mine, "client", "CLIENT")
    server = _one(mine, "service-b", "SERVER")
    assert client.attributes["rpc.grpc.status_code"] == 8 == server.attributes["rpc.grpc.status_code"]
    assert client.status_code == 2  # STATUS_CODE_ERROR
    assert server.parent_span_id == client.span_id
