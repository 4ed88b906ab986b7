"""trace_aio_channel against real grpc.aio servers traced by the interceptor or by trace_aio_server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from echo.servicer import EchoServicer
from echo.v1 import echo_pb2, echo_pb2_grpc
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rpcmesh.telemetry import (
    DISABLED,
    AioServerTracingInterceptor,
    Telemetry,
    TelemetryConfig,
    correlation_id,
    setup_telemetry,
    trace_aio_channel,
    trace_aio_server,
    use_correlation_id,
)


@pytest.fixture
def memory() -> Iterator[tuple[Telemetry, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(
        TelemetryConfig(service_name="chan"),
        install=False,
        span_exporters=[exporter],
        simple_span_processor=True,
    )
    try:
        yield telemetry, exporter
    finally:
        telemetry.shutdown()


class CorrelatedEcho(EchoServicer):
    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        if request.message == "baggage":
            tenant = baggage.get_baggage("tenant")
            return echo_pb2.EchoResponse(message=f"{correlation_id()}|{tenant}")
        if request.message == "cid":
            return echo_pb2.EchoResponse(message=correlation_id() or "")
        return await super().Echo(request, context)


@pytest.fixture(params=["interceptor", "trace_aio_server"])
async def address(
    memory: tuple[Telemetry, InMemorySpanExporter], request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """An Echo server traced by AioServerTracingInterceptor, or by trace_aio_server (no interceptor)."""
    telemetry, _ = memory
    if request.param == "interceptor":
        server = grpc.aio.server(interceptors=[AioServerTracingInterceptor(telemetry)])
        echo_pb2_grpc.add_EchoServicer_to_server(CorrelatedEcho("s1"), server)
    else:
        server = grpc.aio.server()
        echo_pb2_grpc.add_EchoServicer_to_server(CorrelatedEcho("s1"), trace_aio_server(server, telemetry))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def _by_kind(exporter: InMemorySpanExporter, kind: str) -> list[Any]:
    return [span for span in exporter.get_finished_spans() if span.kind.name == kind]


async def test_all_four_shapes_are_traced_with_parent_links(
    memory: tuple[Telemetry, InMemorySpanExporter], address: str
) -> None:
    telemetry, exporter = memory
    async with trace_aio_channel(grpc.aio.insecure_channel(address), telemetry, target=address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        with use_correlation_id("corr-4"):
            reply = await stub.Echo(echo_pb2.EchoRequest(message="hi"), timeout=10)
            assert reply.message == "hi"
            expanded = [r.message async for r in stub.Expand(echo_pb2.ExpandRequest(message="e", repeat=3))]
            assert expanded == ["e"] * 3

            async def requests() -> AsyncIterator[echo_pb2.CollectRequest]:
                for word in ("a", "b"):
                    yield echo_pb2.CollectRequest(message=word)

            collected = await stub.Collect(requests(), timeout=10)
            assert collected.message == "a b"
            chat = stub.Chat(timeout=10)
            await chat.write(echo_pb2.ChatRequest(message="c"))
            assert (await chat.read()).message == "c"
            await chat.done_writing()
            assert await chat.read() is grpc.aio.EOF
            assert await chat.code() == grpc.StatusCode.OK
    telemetry.force_flush()
    clients = {span.context.span_id: span for span in _by_kind(exporter, "CLIENT")}
    servers = _by_kind(exporter, "SERVER")
    assert sorted(span.name for span in clients.values()) == sorted(
        f"echo.v1.Echo/{m}" for m in ("Echo", "Expand", "Collect", "Chat")
    )
    assert len(servers) == 4
    for span in servers:
        assert span.parent is not None and span.parent.span_id in clients
        assert span.context.trace_id == clients[span.parent.span_id].context.trace_id
        assert span.attributes["rpcmesh.correlation_id"] == "corr-4"
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.attributes["network.peer.address"] == "127.0.0.1"
    for span in clients.values():
        assert span.attributes["server.address"] == "127.0.0.1"
        assert span.attributes["rpcmesh.correlation_id"] == "corr-4"
        assert span.attributes["rpc.grpc.status_code"] == 0


async def test_errors_end_the_span_with_the_status(
    memory: tuple[Telemetry, InMemorySpanExporter], address: str
) -> None:
    telemetry, exporter = memory
    async with trace_aio_channel(grpc.aio.insecure_channel(address), telemetry) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        failing = echo_pb2.EchoRequest(behaviour=echo_pb2.Behaviour(fail_code=14))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Echo(failing, timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        # Awaiting code() instead of the call also ends the span.
        call = stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=10)
        assert await call.code() == grpc.StatusCode.OK
        assert (await call).message == "x"
    (failed_client, ok_client) = sorted(
        _by_kind(exporter, "CLIENT"), key=lambda span: span.attributes["rpc.grpc.status_code"], reverse=True
    )
    assert failed_client.attributes["rpc.grpc.status_code"] == 14
    assert failed_client.status.status_code.name == "ERROR"
    assert ok_client.attributes["rpc.grpc.status_code"] == 0
    failed_server = [s for s in _by_kind(exporter, "SERVER") if s.attributes["rpc.grpc.status_code"] == 14]
    assert len(failed_server) == 1 and failed_server[0].status.status_code.name == "ERROR"


async def test_a_new_correlation_id_and_other_baggage_travel(
    memory: tuple[Telemetry, InMemorySpanExporter], address: str
) -> None:
    telemetry, _ = memory
    async with trace_aio_channel(grpc.aio.insecure_channel(address), telemetry) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        first = (await stub.Echo(echo_pb2.EchoRequest(message="cid"), timeout=10)).message
        second = (await stub.Echo(echo_pb2.EchoRequest(message="cid"), timeout=10)).message
        assert len(first) == 32 and len(second) == 32 and first != second  # one id per first hop
        token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            with use_correlation_id("with-bag"):
                reply = await stub.Echo(echo_pb2.EchoRequest(message="baggage"), timeout=10)
        finally:
            otel_context.detach(token)
    assert reply.message == "with-bag|acme"


async def test_unsampled_calls_export_nothing_but_still_propagate(address: str) -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(
        TelemetryConfig(service_name="chan", sampler="parentbased_always_off"),
        install=False,
        span_exporters=[exporter],
        simple_span_processor=True,
    )
    try:
        async with trace_aio_channel(grpc.aio.insecure_channel(address), telemetry) as channel:
            with use_correlation_id("quiet"):
                reply = await echo_pb2_grpc.EchoStub(channel).Echo(
                    echo_pb2.EchoRequest(message="cid"), timeout=10
                )
        assert reply.message == "quiet"
        assert [s for s in exporter.get_finished_spans() if s.name.startswith("echo")] == []
    finally:
        telemetry.shutdown()


async def test_telemetry_off_passes_calls_through(address: str) -> None:
    async with trace_aio_channel(grpc.aio.insecure_channel(address), DISABLED) as channel:
        with use_correlation_id("off-chan"):
            reply = await echo_pb2_grpc.EchoStub(channel).Echo(
                echo_pb2.EchoRequest(message="cid"), timeout=10
            )
    assert reply.message == "off-chan"


async def test_trace_aio_server_with_status_error_interceptor(
    memory: tuple[Telemetry, InMemorySpanExporter],
) -> None:
    """StatusErrorInterceptor runs outside the wrapped handler: the span still gets the precise code."""
    from rpcmesh.errors import NotFoundError, StatusErrorInterceptor

    class Missing(EchoServicer):
        async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
            raise NotFoundError("order 42 not found")

    telemetry, exporter = memory
    server = grpc.aio.server(interceptors=[StatusErrorInterceptor()])
    echo_pb2_grpc.add_EchoServicer_to_server(Missing("m"), trace_aio_server(server, telemetry))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(), timeout=10)
    finally:
        await server.stop(None)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    (span,) = _by_kind(exporter, "SERVER")
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert span.status.status_code.name == "UNSET"  # NOT_FOUND is the caller's error, not the server's
