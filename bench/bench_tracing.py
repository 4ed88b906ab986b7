"""Tracing overhead: an Echo service over grpc.aio with rpcmesh's telemetry interceptors on vs off.

    .venv/bin/python bench/bench_tracing.py [--seconds 3] [--rounds 3] [--inflight 32]

"on": client and server tracing interceptors, spans through a BatchSpanProcessor into an
exporter that discards them (the export cost itself is the collector's), and metrics
(call duration histograms) into an in-memory reader. "off": no interceptors at all.
Each server runs in its own process; the client alternates on/off windows and takes
medians. Prints one JSON line: ``tracing_throughput_ratio`` (on ÷ off), p50 ratio at
1 in flight, and the raw figures. ``bench/bench_client.py`` can import ``run_tracing_bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
from echo.servicer import EchoServicer  # noqa: E402
from echo.v1 import echo_pb2, echo_pb2_grpc  # noqa: E402

from rpcmesh.telemetry import (  # noqa: E402
    AioServerTracingInterceptor,
    Telemetry,
    TelemetryConfig,
    aio_client_interceptors,
    setup_telemetry,
)

SAMPLER_RATIO = 1.0


def _telemetry(service_name: str) -> Telemetry:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class DiscardingExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    return setup_telemetry(
        TelemetryConfig(
            service_name=service_name, sampler="parentbased_traceidratio", sampler_ratio=SAMPLER_RATIO
        ),
        install=False,
        span_exporters=[DiscardingExporter()],
        metric_readers=[InMemoryMetricReader()],
    )


class _PassThroughServer(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        return await continuation(handler_call_details)


class _PassThroughClient(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(client_call_details, request)


async def serve(mode: str) -> None:
    """Child process: serve Echo with the tracing interceptor (on), a pass-through one, or none (off)."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if mode == "on":
        interceptors = [AioServerTracingInterceptor(_telemetry("bench-server"))]
    elif mode == "passthrough":
        interceptors = [_PassThroughServer()]
    server = grpc.aio.server(interceptors=interceptors)
    echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer(mode), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


async def _throughput(stub: echo_pb2_grpc.EchoStub, seconds: float, inflight: int) -> float:
    request = echo_pb2.EchoRequest(message="x" * 32)
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await stub.Echo(request)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return done / (time.perf_counter() - started)


async def _p50_ms(stub: echo_pb2_grpc.EchoStub, calls: int) -> float:
    request = echo_pb2.EchoRequest(message="x" * 32)
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await stub.Echo(request)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def run_tracing_bench(
    addresses: dict[str, str], *, seconds: float = 3.0, rounds: int = 3, inflight: int = 32
) -> dict[str, Any]:
    """Measure the servers in ``addresses`` (modes ``off``, ``on``, optionally ``passthrough``).

    The "on" channel carries the tracing client interceptors, "passthrough" one that does nothing
    (the cost of grpc.aio's interceptor machinery alone, which any interceptor pays), "off" none.
    """
    telemetry = _telemetry("bench-client")
    client_interceptors: dict[str, list[Any]] = {
        "off": [],
        "on": list(aio_client_interceptors(telemetry)),
        "passthrough": [_PassThroughClient()],
    }
    channels = {
        mode: grpc.aio.insecure_channel(address, interceptors=client_interceptors[mode])
        for mode, address in addresses.items()
    }
    rates: dict[str, list[float]] = {mode: [] for mode in channels}
    p50s: dict[str, list[float]] = {mode: [] for mode in channels}
    try:
        stubs = {mode: echo_pb2_grpc.EchoStub(channel) for mode, channel in channels.items()}
        for stub in stubs.values():  # warm up connections and code paths
            await _throughput(stub, 0.5, inflight)
        for _ in range(rounds):
            for mode, stub in stubs.items():
                rates[mode].append(await _throughput(stub, seconds, inflight))
                p50s[mode].append(await _p50_ms(stub, 300))
    finally:
        for channel in channels.values():
            await channel.close()
        telemetry.shutdown()
    rate = {mode: statistics.median(values) for mode, values in rates.items()}
    p50 = {mode: statistics.median(values) for mode, values in p50s.items()}
    figures: dict[str, Any] = {
        "tracing_throughput_ratio": round(rate["on"] / rate["off"], 3),
        "tracing_p50_ratio": round(p50["on"] / p50["off"], 3),
        "sampler_ratio": SAMPLER_RATIO,
    }
    if "passthrough" in rate:
        figures["tracing_vs_passthrough_throughput_ratio"] = round(rate["on"] / rate["passthrough"], 3)
        figures["passthrough_throughput_ratio"] = round(rate["passthrough"] / rate["off"], 3)
    for mode in rate:
        figures[f"{mode}_calls_per_s"] = round(rate[mode], 1)
        figures[f"{mode}_p50_ms"] = round(p50[mode], 3)
    figures.update(
        {
            "inflight": inflight,
            "seconds_per_window": seconds,
            "rounds": rounds,
        }
    )
    return figures


def _start_server(mode: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, "--sampler-ratio", str(SAMPLER_RATIO)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"bench server ({mode}) did not start: {line!r}")
    return process, line.rsplit(" ", 1)[1].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--serve", choices=["on", "off", "passthrough"], help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument(
        "--sampler-ratio", type=float, default=1.0, help="share of traces sampled (default all)"
    )
    args = parser.parse_args()
    global SAMPLER_RATIO
    SAMPLER_RATIO = args.sampler_ratio
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    servers = {mode: _start_server(mode) for mode in ("off", "on", "passthrough")}
    try:
        figures = asyncio.run(
            run_tracing_bench(
                {mode: address for mode, (_, address) in servers.items()},
                seconds=args.seconds,
                rounds=args.rounds,
                inflight=args.inflight,
            )
        )
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=10)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
