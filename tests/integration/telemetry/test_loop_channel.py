"""LoopChannel and the OTLP span exporter built on it, against a real OTLP/gRPC receiver."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from rpcmesh.telemetry.loop_channel import LoopChannel
from rpcmesh.telemetry.otlp import EXPORT_METHOD, CachingOtlpSpanExporter
from tests.support.otlp_collector import OtlpCollector


def _export(channel: LoopChannel) -> object:
    return channel.unary_unary(
        EXPORT_METHOD,
        request_serializer=ExportTraceServiceRequest.SerializeToString,
        response_deserializer=ExportTraceServiceResponse.FromString,
    )


def test_calls_from_many_threads_and_from_a_thread_running_a_loop(collector: OtlpCollector) -> None:
    channel = LoopChannel(collector.endpoint.removeprefix("http://"))
    export = _export(channel)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            replies = list(pool.map(lambda _: export(ExportTraceServiceRequest(), timeout=5), range(20)))
        assert all(isinstance(reply, ExportTraceServiceResponse) for reply in replies)

        async def from_a_coroutine() -> object:  # blocks this loop, never the channel's own
            return export(ExportTraceServiceRequest(), timeout=5)

        assert isinstance(asyncio.run(from_a_coroutine()), ExportTraceServiceResponse)
    finally:
        channel.close()
    assert not any(thread.name == "rpcmesh-loop-channel" for thread in threading.enumerate())
    with pytest.raises(ValueError, match="closed"):
        export(ExportTraceServiceRequest(), timeout=5)
    channel.close()  # a second close does nothing


def test_errors_are_grpc_rpc_errors_with_their_code(unused_tcp_port: int) -> None:
    channel = LoopChannel(f"127.0.0.1:{unused_tcp_port}")
    try:
        with pytest.raises(grpc.RpcError) as raised:
            _export(channel)(ExportTraceServiceRequest(), timeout=2)
        assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        # The SDK's retry reads dict(error.trailing_metadata()): it must be pairs.
        assert "google.rpc.retryinfo-bin" not in dict(raised.value.trailing_metadata() or ())
    finally:
        channel.close()


def test_span_exporter_sends_through_its_loop_and_stops_its_thread(collector: OtlpCollector) -> None:
    exporter = CachingOtlpSpanExporter(endpoint=collector.endpoint, insecure=True)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("loop-exported"):
        pass
    spans = collector.wait_for_spans(lambda spans: any(s.name == "loop-exported" for s in spans), timeout=10)
    assert [s.name for s in spans] == ["loop-exported"]
    provider.shutdown()
    assert not any(thread.name == "rpcmesh-otlp-export" for thread in threading.enumerate())
