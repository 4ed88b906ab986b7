"""Server interceptors in-process: sync server, StatusError codes, telemetry off, Prometheus scrape."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rpcmesh.errors import NotFoundError, StatusErrorInterceptor
from rpcmesh.telemetry import (
    DISABLED,
    AioServerTracingInterceptor,
    SyncServerTracingInterceptor,
    Telemetry,
    TelemetryConfig,
    aio_client_interceptors,
    correlation_id,
    setup_telemetry,
    sync_client_interceptors,
    use_correlation_id,
)


@pytest.fixture
def memory() -> Iterator[tuple[Telemetry, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(
        TelemetryConfig(service_name="mem"),
        install=False,
        span_exporters=[exporter],
        simple_span_processor=True,
    )
    try:
        yield telemetry, exporter
    finally:
        telemetry.shutdown()


class SyncEcho(echo_pb2_grpc.EchoServicer):
    def Echo(self, request: echo_pb2.EchoRequest, context: grpc.ServicerContext) -> echo_pb2.EchoResponse:
        if request.behaviour.fail_code:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        return echo_pb2.EchoResponse(message=correlation_id() or "", instance_id="sync")

    def Expand(self, request: echo_pb2.ExpandRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        for _ in range(request.repeat):
            yield echo_pb2.ExpandResponse(message=correlation_id() or "")


def test_sync_server_and_client(memory: tuple[Telemetry, InMemorySpanExporter]) -> None:
    telemetry, exporter = memory
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), interceptors=[SyncServerTracingInterceptor(telemetry)]
    )
    echo_pb2_grpc.add_EchoServicer_to_server(SyncEcho(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as raw:
            stub = echo_pb2_grpc.EchoStub(grpc.intercept_channel(raw, *sync_client_interceptors(telemetry)))
            with use_correlation_id("sync-srv"):
                assert stub.Echo(echo_pb2.EchoRequest(), timeout=10).message == "sync-srv"
                assert [r.message for r in stub.Expand(echo_pb2.ExpandRequest(repeat=2), timeout=10)] == [
                    "sync-srv"
                ] * 2
                with pytest.raises(grpc.RpcError):
                    stub.Echo(echo_pb2.EchoRequest(behaviour=echo_pb2.Behaviour(fail_code=7)), timeout=10)
            # A pool thread is reused: the next call without an id must not see the previous one.
            fresh = stub.Echo(echo_pb2.EchoRequest(), timeout=10).message
            assert fresh not in ("", "sync-srv")
    finally:
        server.stop(None)
    servers = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
    codes = sorted(s.attributes["rpc.grpc.status_code"] for s in servers)
    assert codes == [0, 0, 0, 7]
    clients = {s.context.span_id: s for s in exporter.get_finished_spans() if s.kind.name == "CLIENT"}
    for span in servers:
        assert span.parent is not None and span.parent.span_id in clients


class RaisingEcho(echo_pb2_grpc.EchoServicer):
    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        raise NotFoundError("order 42 not found")


async def test_status_error_code_is_recorded(memory: tuple[Telemetry, InMemorySpanExporter]) -> None:
    telemetry, exporter = memory
    server = grpc.aio.server(interceptors=[AioServerTracingInterceptor(telemetry), StatusErrorInterceptor()])
    echo_pb2_grpc.add_EchoServicer_to_server(RaisingEcho(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(None)
    (span,) = exporter.get_finished_spans()
    assert span.attributes["rpc.grpc.status_code"] == 5
    assert span.parent is None  # the caller sent no traceparent: a new trace starts here
    assert len(str(span.attributes["rpcmesh.correlation_id"])) == 32


class CorrelationEcho(echo_pb2_grpc.EchoServicer):
    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        sent = dict(context.invocation_metadata())
        return echo_pb2.EchoResponse(message=f"{correlation_id()}|{'traceparent' in sent}")


async def test_telemetry_off_still_carries_the_correlation_id() -> None:
    server = grpc.aio.server(interceptors=[AioServerTracingInterceptor(DISABLED)])
    echo_pb2_grpc.add_EchoServicer_to_server(CorrelationEcho(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=aio_client_interceptors(DISABLED)
        ) as channel:
            with use_correlation_id("off-1"):
                reply = await echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(), timeout=10)
    finally:
        await server.stop(None)
    assert reply.message == "off-1|False"


def test_prometheus_scrape_endpoint() -> None:
    telemetry = setup_telemetry(
        TelemetryConfig(service_name="prom", metrics_exporters=("prometheus",), prometheus_port=0),
        install=False,
    )
    try:
        port = telemetry.prometheus_port
        assert port
        telemetry.metrics.server_call("echo.v1.Echo", "Echo", grpc.StatusCode.OK, 0.003)
        telemetry.metrics.bus_published("orders", 2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
    finally:
        telemetry.shutdown()
    assert "rpc_server_call_duration" in body
    assert "rpcmesh_bus_published" in body
