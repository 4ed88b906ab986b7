"""Tracing overhead: an Echo service over grpc.aio with rpcmesh's tracing and metrics on vs off.

    .venv/bin/python bench/bench_tracing.py [--seconds 1] [--rounds 10] [--inflight 32]
        [--sampler-ratio 1.0] [--exporter otlp|discard] [--with-interceptors] [--floor]
        [--variant nometrics|nospans] [--official] [--sampled] [--fast-paths]

Modes, each with its own server (all servers in one child process, the client in this one; the
client alternates between modes, round after round, and takes medians):

- ``off``: no tracing anywhere (plain channel, server without interceptors).
- ``on``: client ``trace_aio_channel`` + server ``trace_aio_server``; spans through
  rpcmesh's batch ``SpanPipeline`` into the exporter, call-duration histograms into a reader.
- ``interceptors`` (``--with-interceptors``): the same but the client uses
  ``aio_client_interceptors`` (grpc.aio's interceptor machinery).
- ``on-nometrics`` / ``on-nospans`` (``--variant nometrics|nospans``, repeatable): ``on`` without
  the duration histograms / without spans, on both sides, measured in the same rounds as ``on``:
  a same-process A/B of one piece of the telemetry (an A/A run of ``on`` against itself differs by
  up to ~9 µs of CPU per call on these machines).
- ``official`` (``--official``): the official ``opentelemetry-instrumentation-grpc`` instead of
  rpcmesh: its aio client interceptors and aio server interceptor, each process with a stock SDK
  ``TracerProvider`` (parent-based always-on), ``BatchSpanProcessor`` and ``OTLPSpanExporter`` to
  the same receiver (``--exporter discard``: a discarding exporter). It records no metrics.
- ``sampled`` (``--sampled``): ``on`` with parent-based 1 % sampling, metrics on (the goal: ≥ 0.90).
- ``fallback-<path>`` and ``fallback-all`` (``--fast-paths``): ``on`` with one (or every)
  private-name fast path of ``rpcmesh.telemetry.private_api`` turned off on both sides, so each
  path's gain is measured in the same rounds (``fast_path_gain_<path>``: on ÷ fallback-<path>).
  The exporter and the duration histograms are chosen when each mode's telemetry is built (the
  server child also switches its flags when the client starts a mode's window: one mode at a time).
- ``propagation`` (``--floor``): no telemetry at all, only what any implementation of issue 7
  must do on the wire: the client sends the three propagation headers (a fresh ``traceparent``
  and correlation id per call, as ``baggage`` and ``x-correlation-id``), the server reads them
  from the call's metadata. No span, no export, no histogram: the floor of the tracing cost.

``--exporter otlp`` (default): a real OTLP/gRPC span exporter in every traced process, sending to
a local receiver process that parses each export and counts the spans. ``--exporter discard``:
the batch pipeline with an exporter that drops the batches (rpcmesh's own cost only).

Each throughput window ends when both sides have exported the window's spans (a flush), and
its time and CPU include that: export work is charged to the window whose calls made the spans.
``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``, when set, replaces rpcmesh's span batch size on both sides.

Prints one JSON line: ``tracing_throughput_ratio`` (on ÷ off at 32 in flight: the median over
rounds of each round's ratio), the p50 ratio (1 in flight), the per-call microseconds of the
tracing work measured in-process, and the raw figures; with ``--floor`` also
``propagation_floor_ratio`` (propagation ÷ off) and its CPU ratio; per ``--variant``,
``on-<variant>_throughput_ratio`` (÷ off).

With ``--official``: ``official_throughput_ratio`` (÷ off), ``rpcmesh_vs_official`` (on ÷ official,
per round; goal ≥ 1.6) and their CPU counterparts; with ``--sampled``:
``sampled_1pct_throughput_ratio``; with ``--fast-paths``: ``fast_path_gain_<path>`` and
``fallback-<path>_throughput_ratio``.

Every mode serves ``BenchEchoServicer``: the example servicer minus its echo of the caller's
``x-*`` metadata as trailers (a test aid for proxies), which would make traced calls, and only
them, carry an extra trailer (``echoed-x-correlation-id``) that no real service sends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
from echo.servicer import EchoServicer  # noqa: E402
from echo.v1 import echo_pb2, echo_pb2_grpc  # noqa: E402
from process_cpu import cpu_seconds  # noqa: E402

from rpcmesh.telemetry import (  # noqa: E402
    CORRELATION_BAGGAGE_KEY,
    CORRELATION_METADATA_KEY,
    DISABLED,
    AioServerTracingInterceptor,
    Telemetry,
    TelemetryConfig,
    aio_client_interceptors,
    new_correlation_id,
    private_api,
    setup_telemetry,
    trace_aio_channel,
    trace_aio_server,
)
from rpcmesh.telemetry.traceparent import format_traceparent  # noqa: E402

_TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_PROPAGATED = frozenset({"traceparent", "baggage", CORRELATION_METADATA_KEY})
_LOW_64 = (1 << 64) - 1


class BenchEchoServicer(EchoServicer):
    """The example Echo servicer without the echo of ``x-*`` metadata as trailers."""

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> echo_pb2.EchoResponse:
        self.served += 1
        return echo_pb2.EchoResponse(
            message=request.message, instance_id=self.instance_id, served=self.served
        )


class PropagationOnlyEchoServicer(BenchEchoServicer):
    """``propagation`` mode's server: reads the three propagation headers, records nothing."""

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> echo_pb2.EchoResponse:
        self.propagated = [value for key, value in context.invocation_metadata() or () if key in _PROPAGATED]
        return await super().Echo(request, context)


class PropagationOnlyStub:
    """``propagation`` mode's client: a plain stub whose calls carry fresh propagation headers."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = echo_pb2_grpc.EchoStub(channel)
        self._ids = random.Random()

    def Echo(self, request: echo_pb2.EchoRequest) -> Any:
        bits = self._ids.getrandbits(192)
        correlation = new_correlation_id()
        metadata = (
            ("traceparent", format_traceparent(bits >> 64, bits & _LOW_64 or 1, 1)),
            ("baggage", f"{CORRELATION_BAGGAGE_KEY}={correlation}"),
            (CORRELATION_METADATA_KEY, correlation),
        )
        return self._stub.Echo(request, metadata=metadata)


def _telemetry(
    service_name: str, ratio: float, endpoint: str | None, *, spans: bool = True, metrics: bool = True
) -> Telemetry:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class DiscardingExporter(SpanExporter):
        accepts_call_spans = True  # like the OTLP exporter: takes rpcmesh's CallSpans as they are

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    # Span batch size: rpcmesh's default, or OTEL_BSP_MAX_EXPORT_BATCH_SIZE when set (children inherit it).
    batch = os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
    config = TelemetryConfig(
        service_name=service_name,
        sampler="parentbased_traceidratio",
        sampler_ratio=ratio,
        traces_exporters=("otlp",) if endpoint and spans else ("none",),
        otlp_traces_endpoint=endpoint,
        **({"span_batch_size": int(batch)} if batch else {}),
    )
    return setup_telemetry(
        config,
        install=False,
        span_exporters=[DiscardingExporter()] if spans and not endpoint else [],
        metric_readers=[InMemoryMetricReader()] if metrics else [],
    )


# --variant: "on" without one piece of the telemetry, on both sides (keyword arguments of _telemetry).
VARIANTS: dict[str, dict[str, bool]] = {"nometrics": {"metrics": False}, "nospans": {"spans": False}}


def _variant(mode: str) -> dict[str, bool]:
    """What ``_telemetry`` leaves out for ``mode`` (``on-nometrics``: metrics; other modes: nothing)."""
    return VARIANTS[mode.removeprefix("on-")] if mode.startswith("on-") else {}


FAST_PATHS = ("otlp_exporter", "duration_reader")
SAMPLED_RATIO = 0.01


def _fallbacks(mode: str) -> tuple[str, ...]:
    """The private-name fast paths ``mode`` turns off (``fallback-<path>``, ``fallback-all``)."""
    if not mode.startswith("fallback-"):
        return ()
    name = mode.removeprefix("fallback-")
    return FAST_PATHS if name == "all" else (name,)


def _set_fast_paths(off: Sequence[str]) -> None:
    """Turn the fast paths in ``off`` off and every other one back on (those whose probe succeeded)."""
    for name in FAST_PATHS:
        private_api.force_fallback(name, fast=name not in off)


class _Official:
    """The official instrumentation's tracing in one process: stock SDK provider, batch processor."""

    def __init__(self, service_name: str, endpoint: str | None) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider, sampling
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        class Discard(SpanExporter):
            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            sampler=sampling.ParentBased(sampling.ALWAYS_ON),
        )
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True) if endpoint else Discard()
        self.provider.add_span_processor(BatchSpanProcessor(exporter))

    def force_flush(self) -> bool:
        return bool(self.provider.force_flush())

    def shutdown(self) -> None:
        self.provider.shutdown()


# --decompose: server variants, all registered through trace_aio_server, in one process.
DECOMPOSE = {
    "off": "no telemetry",
    "correlation": "handler wrapper carrying the correlation id only (telemetry off)",
    "metrics": "duration histogram only",
    "spans": "spans only (batch pipeline, discarding exporter)",
    "full": "spans and histogram",
}


def serve_collector() -> None:
    """Child process: an OTLP/gRPC trace receiver that parses every export and counts its spans."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    count = 0
    lock = threading.Lock()

    def export(request: trace_service_pb2.ExportTraceServiceRequest, context: Any) -> Any:
        nonlocal count
        spans = sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        with lock:
            count += spans
        return trace_service_pb2.ExportTraceServiceResponse()

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {
            "Export": grpc.unary_unary_rpc_method_handler(
                export,
                request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
                response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    sys.stdin.readline()  # the parent closes stdin (or writes a line) when done
    with lock:
        print(f"spans {count}", flush=True)
    server.stop(None)


async def serve(modes: list[str], ratio: float, endpoint: str | None) -> None:
    """Child process: one Echo server per mode, all in this process and event loop.

    One process for every mode, so the modes share the same core placement and neighbours on a
    shared machine: its CPU time per call is then comparable between modes (separate processes
    differ by tens of microseconds per call from placement alone).
    """
    servers: list[grpc.aio.Server] = []
    telemetries: list[Any] = []
    addresses: list[str] = []
    for mode in modes:
        interceptors: list[grpc.aio.ServerInterceptor] = []
        telemetry = None
        _set_fast_paths(_fallbacks(mode))  # the exporter and histograms are chosen now
        if mode == "official":
            from opentelemetry.instrumentation.grpc import aio_server_interceptor

            official = _Official("bench-server-official", endpoint)
            telemetries.append(official)
            interceptors = [aio_server_interceptor(tracer_provider=official.provider)]
        elif mode == "sampled":
            telemetry = _telemetry(f"bench-server-{mode}", SAMPLED_RATIO, endpoint)
            telemetries.append(telemetry)
        elif mode.startswith("fallback-"):
            telemetry = _telemetry(f"bench-server-{mode}", ratio, endpoint)
            telemetries.append(telemetry)
        elif mode in ("metrics", "spans", "full"):
            telemetry = _telemetry(
                f"bench-{mode}", ratio, None, spans=mode != "metrics", metrics=mode != "spans"
            )
            telemetries.append(telemetry)
        elif mode == "correlation":
            telemetry = DISABLED
        elif mode not in ("off", "propagation"):
            telemetry = _telemetry(f"bench-server-{mode}", ratio, endpoint, **_variant(mode))
            telemetries.append(telemetry)
        if mode == "interceptors":
            interceptors = [AioServerTracingInterceptor(telemetry)]
        server = grpc.aio.server(interceptors=interceptors)
        # "on": the servicer is registered through trace_aio_server (no interceptor machinery).
        plain = mode in ("off", "interceptors", "propagation", "official")
        target = server if plain else trace_aio_server(server, telemetry)
        servicer = PropagationOnlyEchoServicer(mode) if mode == "propagation" else BenchEchoServicer(mode)
        echo_pb2_grpc.add_EchoServicer_to_server(servicer, target)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        addresses.append(f"{mode}=127.0.0.1:{port}")
    _set_fast_paths(())
    print(f"listening on {','.join(addresses)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def switch() -> None:  # the client's start of a mode's window: "mode <name>" on stdin
        line = sys.stdin.readline()
        if not line:
            loop.remove_reader(sys.stdin.fileno())
            return
        _set_fast_paths(_fallbacks(line.split()[-1]))
        print("switched", flush=True)

    loop.add_reader(sys.stdin.fileno(), switch)

    def flush() -> None:  # the client's end-of-window request: export what is queued, then say so
        for telemetry in telemetries:
            telemetry.force_flush()
        print("flushed", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, flush)
    await stop.wait()
    for server in servers:
        await server.stop(None)
    for telemetry in telemetries:
        telemetry.shutdown()  # exports what is still queued


async def _throughput(stub: Any, seconds: float, inflight: int) -> float:
    calls, elapsed = await _calls_in(stub, seconds, inflight)
    return calls / elapsed


async def _calls_in(stub: Any, seconds: float, inflight: int) -> tuple[int, float]:
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
    return done, time.perf_counter() - started


async def _p50_ms(stub: Any, calls: int) -> float:
    request = echo_pb2.EchoRequest(message="x" * 32)
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await stub.Echo(request)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def run_tracing_bench(
    addresses: dict[str, str],
    *,
    seconds: float = 1.0,
    rounds: int = 10,
    inflight: int = 32,
    ratio: float = 1.0,
    endpoint: str | None = None,
    pids: dict[str, int] | None = None,
    server: subprocess.Popen[str] | None = None,
) -> dict[str, Any]:
    """Measure the servers in ``addresses`` (modes ``off``, ``on``, optionally ``interceptors``).

    Each window ends with a flush of both sides' span pipelines (``server``: the child serving
    every mode, asked with SIGUSR1), and the window's time and CPU include it: the export work
    of a window's spans is charged to that window, not to whichever window runs next (with
    batches as large as a window's spans, most of it would otherwise land in the next one).
    """
    telemetry = _telemetry("bench-client", ratio, endpoint)
    telemetries: list[Any] = [telemetry]
    channels: dict[str, Any] = {}
    for mode, address in addresses.items():
        _set_fast_paths(_fallbacks(mode))  # the exporter, histograms and callables are chosen now
        if mode == "official":
            from opentelemetry.instrumentation.grpc import aio_client_interceptors as official_interceptors

            official = _Official("bench-client-official", endpoint)
            telemetries.append(official)
            channels[mode] = grpc.aio.insecure_channel(
                address, interceptors=official_interceptors(tracer_provider=official.provider)
            )
        elif mode == "sampled" or mode.startswith("fallback-"):
            handle = _telemetry(
                f"bench-client-{mode}", SAMPLED_RATIO if mode == "sampled" else ratio, endpoint
            )
            telemetries.append(handle)
            channels[mode] = trace_aio_channel(grpc.aio.insecure_channel(address), handle, target=address)
        elif mode == "on" or mode.startswith("on-"):
            handle = telemetry
            if mode != "on":
                handle = _telemetry(f"bench-client-{mode}", ratio, endpoint, **_variant(mode))
                telemetries.append(handle)
            channels[mode] = trace_aio_channel(grpc.aio.insecure_channel(address), handle, target=address)
        elif mode == "interceptors":
            channels[mode] = grpc.aio.insecure_channel(
                address, interceptors=aio_client_interceptors(telemetry, target=address)
            )
        else:  # off, propagation
            channels[mode] = grpc.aio.insecure_channel(address)
    rates: dict[str, list[float]] = {mode: [] for mode in channels}
    p50s: dict[str, list[float]] = {mode: [] for mode in channels}
    # CPU seconds spent by the client and by the mode's server over all throughput windows, and calls.
    cpu: dict[str, list[float]] = {mode: [0.0, 0.0, 0.0] for mode in channels}
    pids = pids or {}
    try:
        stubs: dict[str, Any] = {}
        for mode, channel in channels.items():
            _set_fast_paths(_fallbacks(mode))  # a stub's callables note whether they are plain grpc.aio
            stubs[mode] = (
                PropagationOnlyStub(channel) if mode == "propagation" else echo_pb2_grpc.EchoStub(channel)
            )
        for mode, stub in stubs.items():  # warm up connections and code paths
            _switch(mode, server)
            await _throughput(stub, 0.5, inflight)
        for index in range(rounds):
            # Alternate the order too, so neither mode always runs right after the other.
            order = list(stubs.items()) if index % 2 == 0 else list(reversed(stubs.items()))
            for mode, stub in order:
                _switch(mode, server)
                client_cpu, server_cpu = cpu_seconds(None), cpu_seconds(pids.get(mode))
                started = time.perf_counter()
                calls, _ = await _calls_in(stub, seconds, inflight)
                _flush(telemetries, server)
                elapsed = time.perf_counter() - started
                cpu[mode][0] += cpu_seconds(None) - client_cpu
                cpu[mode][1] += cpu_seconds(pids.get(mode)) - server_cpu
                cpu[mode][2] += calls
                rates[mode].append(calls / elapsed)
                p50s[mode].append(await _p50_ms(stub, 100))
    finally:
        _set_fast_paths(())
        for channel in channels.values():
            await channel.close()
        for handle in telemetries:
            handle.shutdown()
    rate = {mode: statistics.median(values) for mode, values in rates.items()}
    p50 = {mode: statistics.median(values) for mode, values in p50s.items()}
    # Each round measures every mode back to back: the median of the per-round ratios cancels the
    # load drift of a shared machine better than the ratio of the medians (both are reported).
    paired = [on / off for on, off in zip(rates["on"], rates["off"], strict=True)]

    def against(mode: str, base: str) -> float:
        return round(statistics.median(m / o for m, o in zip(rates[mode], rates[base], strict=True)), 3)

    def against_off(mode: str) -> float:
        return against(mode, "off")

    figures: dict[str, Any] = {
        "tracing_throughput_ratio": round(statistics.median(paired), 3),
        "ratio_of_median_rates": round(rate["on"] / rate["off"], 3),
        "tracing_p50_ratio": round(p50["on"] / p50["off"], 3),
        "sampler_ratio": ratio,
        "exporter": "otlp" if endpoint else "discard",
    }
    for mode in rate:
        if mode == "interceptors" or mode.startswith(("on-", "fallback-")):
            figures[f"{mode}_throughput_ratio"] = against_off(mode)
        if mode.startswith("fallback-"):  # what the fast path(s) buy: on ÷ fallback, per round
            figures[f"fast_path_gain_{mode.removeprefix('fallback-')}"] = against("on", mode)
    if "official" in rate:
        figures["official_throughput_ratio"] = against_off("official")
        figures["rpcmesh_vs_official"] = against("on", "official")
    if "sampled" in rate:
        figures["sampled_1pct_throughput_ratio"] = against_off("sampled")
    if "propagation" in rate:
        figures["propagation_floor_ratio"] = against_off("propagation")
    for mode in rate:
        figures[f"{mode}_calls_per_s"] = round(rate[mode], 1)
        figures[f"{mode}_p50_ms"] = round(p50[mode], 3)
    figures["on_ratio_per_round"] = [round(value, 3) for value in paired]
    if pids:
        # CPU per call of each process: robust to a shared machine's load, unlike wall-clock rates.
        # With client and server each on a core of their own, the busier one bounds the throughput.
        per_call = {mode: (c / n * 1e6, s / n * 1e6) for mode, (c, s, n) in cpu.items() if n}
        for mode, (client_us, server_us) in per_call.items():
            figures[f"{mode}_client_cpu_us_per_call"] = round(client_us, 1)
            figures[f"{mode}_server_cpu_us_per_call"] = round(server_us, 1)
        figures["cpu_throughput_ratio"] = round(max(per_call["off"]) / max(per_call["on"]), 3)
        for mode, key in (
            ("official", "official_cpu_throughput_ratio"),
            ("sampled", "sampled_1pct_cpu_ratio"),
        ):
            if mode in per_call:
                figures[key] = round(max(per_call["off"]) / max(per_call[mode]), 3)
        if "official" in per_call:
            figures["rpcmesh_vs_official_cpu"] = round(max(per_call["official"]) / max(per_call["on"]), 3)
        for mode in per_call:
            if mode.startswith("fallback-"):
                name = mode.removeprefix("fallback-")
                figures[f"fast_path_cpu_gain_{name}"] = round(max(per_call[mode]) / max(per_call["on"]), 3)
        if "propagation" in per_call:
            figures["propagation_floor_cpu_ratio"] = round(
                max(per_call["off"]) / max(per_call["propagation"]), 3
            )
    figures.update({"inflight": inflight, "seconds_per_window": seconds, "rounds": rounds})
    return figures


def _switch(mode: str, server: subprocess.Popen[str] | None) -> None:
    """Set this process's and the server child's private-name fast paths for ``mode``'s window."""
    _set_fast_paths(_fallbacks(mode))
    if server is not None and server.stdin is not None and server.stdout is not None:
        server.stdin.write(f"mode {mode}\n")
        server.stdin.flush()
        line = server.stdout.readline()
        if line.strip() != "switched":
            raise RuntimeError(f"bench server did not switch: {line!r}")


def _flush(telemetries: Sequence[Any], server: subprocess.Popen[str] | None) -> None:
    """Export every span both sides hold; returns once the server acknowledged."""
    for telemetry in telemetries:
        telemetry.force_flush()
    if server is not None and server.stdout is not None:
        server.send_signal(signal.SIGUSR1)
        line = server.stdout.readline()
        if line.strip() != "flushed":
            raise RuntimeError(f"bench server did not flush: {line!r}")


async def decompose(
    addresses: dict[str, str], pid: int, *, seconds: float, rounds: int, inflight: int
) -> dict[str, Any]:
    """Server CPU µs per call of each ``DECOMPOSE`` variant; every client call is fully traced."""
    telemetry = _telemetry("bench-client", 1.0, None)
    channels = {
        mode: trace_aio_channel(grpc.aio.insecure_channel(address), telemetry)
        for mode, address in addresses.items()
    }
    totals = {mode: [0.0, 0] for mode in channels}
    try:
        stubs = {mode: echo_pb2_grpc.EchoStub(channel) for mode, channel in channels.items()}
        for stub in stubs.values():
            await _throughput(stub, 0.3, inflight)
        for index in range(rounds):
            order = list(stubs.items()) if index % 2 == 0 else list(reversed(stubs.items()))
            for mode, stub in order:
                before = cpu_seconds(pid)
                calls, _ = await _calls_in(stub, seconds, inflight)
                totals[mode][0] += cpu_seconds(pid) - before
                totals[mode][1] += calls
    finally:
        for channel in channels.values():
            await channel.close()
        telemetry.shutdown()
    return {
        f"server_cpu_us_per_call_{mode}": round(cpu / calls * 1e6, 1) for mode, (cpu, calls) in totals.items()
    }


def per_call_microseconds(ratio: float, calls: int = 20000) -> dict[str, float]:
    """The tracing work of one call per side, in-process, without gRPC (median of 5 runs, µs)."""
    from rpcmesh.telemetry._calls import begin_client_call, begin_server_call

    telemetry = _telemetry("bench-micro", ratio, None)
    method = "/echo.v1.Echo/Echo"
    ok = grpc.StatusCode.OK
    _, sent = begin_client_call(telemetry, method, None, "127.0.0.1:50051")

    def client() -> None:
        record, _ = begin_client_call(telemetry, method, None, "127.0.0.1:50051")
        record.finish(ok)

    def server() -> None:
        begin_server_call(telemetry, method, sent).finish(ok)

    def metrics() -> None:
        telemetry.metrics.client_call("echo.v1.Echo", "Echo", ok, 0.001)

    results: dict[str, float] = {}
    try:
        for name, work in (("client", client), ("server", server), ("metrics_record", metrics)):
            samples = []
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(calls // 5):
                    work()
                samples.append((time.perf_counter() - started) / (calls // 5) * 1e6)
            results[f"{name}_call_us" if name != "metrics_record" else "metrics_record_us"] = round(
                statistics.median(samples), 1
            )
    finally:
        telemetry.shutdown()
    return results


def _start(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"bench child {args} did not start: {line!r}")
    return process, line.rsplit(" ", 1)[1].strip()


def start_collector() -> tuple[subprocess.Popen[str], str]:
    """The OTLP/gRPC trace receiver (``--serve-collector``) in a child process, and its endpoint URL."""
    collector, address = _start(["--serve-collector"])
    return collector, f"http://{address}"


def stop_collector(collector: subprocess.Popen[str]) -> int | None:
    """Stop the receiver; returns how many spans it received."""
    assert collector.stdin is not None and collector.stdout is not None
    collector.stdin.close()
    line = collector.stdout.readline()
    collector.wait(timeout=30)
    return int(line.split()[1]) if line.startswith("spans ") else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # comma-separated modes
    parser.add_argument("--serve-collector", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument(
        "--sampler-ratio", type=float, default=1.0, help="share of traces sampled (default all)"
    )
    parser.add_argument("--exporter", choices=["otlp", "discard"], default="otlp")
    parser.add_argument(
        "--with-interceptors", action="store_true", help="also measure aio_client_interceptors"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure the propagation headers alone (no spans, no metrics): the floor",
    )
    parser.add_argument(
        "--variant",
        action="append",
        choices=sorted(VARIANTS),
        help="also measure 'on' without the duration histograms (nometrics) or without spans (nospans)",
    )
    parser.add_argument(
        "--official", action="store_true", help="also measure opentelemetry-instrumentation-grpc (official)"
    )
    parser.add_argument(
        "--sampled", action="store_true", help="also measure rpcmesh at parent-based 1 %% sampling"
    )
    parser.add_argument(
        "--fast-paths", action="store_true", help="also measure each private-name fast path turned off"
    )
    parser.add_argument(
        "--decompose", action="store_true", help="server CPU per call of: " + "; ".join(DECOMPOSE.values())
    )
    args = parser.parse_args()
    if args.serve_collector:
        serve_collector()
        return
    if args.serve:
        asyncio.run(serve(args.serve.split(","), args.sampler_ratio, args.endpoint))
        return

    if args.decompose:
        server, listening = _start(["--serve", ",".join(DECOMPOSE), "--sampler-ratio", "1.0"])
        try:
            found = asyncio.run(
                decompose(
                    dict(item.split("=", 1) for item in listening.split(",")),
                    server.pid,
                    seconds=args.seconds,
                    rounds=args.rounds,
                    inflight=args.inflight,
                )
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
        print(json.dumps(found))
        return

    collector: subprocess.Popen[str] | None = None
    endpoint: str | None = None
    if args.exporter == "otlp":
        collector, endpoint = start_collector()
    modes = ["off", "on"] + (["interceptors"] if args.with_interceptors else [])
    modes += ["propagation"] if args.floor else []
    modes += [f"on-{variant}" for variant in args.variant or ()]
    modes += (["official"] if args.official else []) + (["sampled"] if args.sampled else [])
    modes += [f"fallback-{name}" for name in (*FAST_PATHS, "all")] if args.fast_paths else []
    child_args = ["--sampler-ratio", str(args.sampler_ratio)] + (["--endpoint", endpoint] if endpoint else [])
    server, listening = _start(["--serve", ",".join(modes), *child_args])
    addresses = dict(item.split("=", 1) for item in listening.split(","))
    try:
        figures = asyncio.run(
            run_tracing_bench(
                addresses,
                seconds=args.seconds,
                rounds=args.rounds,
                inflight=args.inflight,
                ratio=args.sampler_ratio,
                endpoint=endpoint,
                pids=dict.fromkeys(modes, server.pid),
                server=server,
            )
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    if collector is not None:
        figures["spans_received_by_collector"] = stop_collector(collector)
    figures.update(per_call_microseconds(args.sampler_ratio))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
