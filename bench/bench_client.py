"""Client benchmark: the same Echo service through a raw grpc.aio channel and through the mesh channel.

Starts a real `rpcmesh up` and one `examples/echo/server.py` instance, then, in
this process, alternates raw and mesh rounds (discovery, retries, breakers and
the retry budget all on, default policies with the method marked idempotent):

* throughput: calls/s with 32 calls in flight for ``--seconds`` per slice;
* latency: p50 of sequential calls (1 in flight), ``--calls`` per slice;
* client CPU per call: this process's CPU time (``/proc``) over the throughput slices divided by
  the calls they completed. The server is the bottleneck of the throughput figure (it spends more
  CPU per call than either client), so the throughput ratio cannot see extra client work:
  ``client_cpu_ratio`` (mesh / raw, goal <= 1.10) does. The server's CPU per call is reported too
  (both clients call the same server process).

Raw and mesh slices alternate ``--rounds`` times, so both see the same machine
load (the machine is shared); figures are medians over the slices. Prints one JSON line with
``throughput_ratio`` (mesh / raw, goal >= 0.90) and ``p50_ratio`` (mesh / raw,
goal <= 1.10), ``client_cpu_ratio`` (mesh / raw, goal <= 1.10) plus the raw and mesh figures.

Telemetry cost, two ways (``--no-tracing`` skips both):

* ``tracing_throughput_ratio``: ``bench_tracing.py`` (a bare grpc.aio Echo server and channel,
  rpcmesh's tracing and metrics on vs nothing at all, real OTLP export): rpcmesh's whole cost.
  The same run measures ``propagation_floor_ratio``: the three propagation headers the issue
  requires (``traceparent``, ``baggage``, ``x-correlation-id``) sent and read with no tracing
  work at all, i.e. the ratio no implementation of the issue can beat on this machine.
* ``mesh_tracing_throughput_ratio``: this benchmark's own path (mesh channel to an Echo
  ``ServiceHost``) with telemetry on (spans to a local OTLP receiver, metrics recorded for a
  Prometheus endpoint) vs off, on both sides: what turning telemetry on costs a deployment.
  The same design as ``bench_tracing.py``: both hosts (``echo`` untraced, ``echo-traced``
  traced) run in ONE server process (same core placement and neighbours, so CPU per call is
  comparable between modes), each window ends with a flush of both sides' span pipelines
  (SIGUSR1 to the server; its time and CPU count in the window) and rates and CPU use the calls
  actually completed. Slices alternate as above; the figure is the median of the per-round
  ratios. ``mesh_tracing_cpu_ratio`` compares the CPU per call of the busier side.

    .venv/bin/python bench/bench_client.py [--rounds 12] [--seconds 1.5] [--calls 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import grpc.aio  # noqa: E402
from bench_tracing import start_collector, stop_collector  # noqa: E402
from echo.v1 import echo_pb2, echo_pb2_grpc  # noqa: E402
from process_cpu import cpu_seconds  # noqa: E402

from rpcmesh.client import Mesh, MeshPolicy, MethodPolicy, ServicePolicy  # noqa: E402
from tests.support.processes import ManagedProcess, python_env, start_control_plane  # noqa: E402

REQUEST = echo_pb2.EchoRequest(message="x" * 32)


async def throughput(call: Callable[[], Awaitable[Any]], seconds: float, in_flight: int = 32) -> float:
    calls, elapsed = await calls_in(call, seconds, in_flight)
    return calls / elapsed


async def calls_in(
    call: Callable[[], Awaitable[Any]], seconds: float, in_flight: int = 32
) -> tuple[int, float]:
    """Calls completed with ``in_flight`` workers for ``seconds``, and the elapsed time."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return done, time.perf_counter() - started


async def p50_ms(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        plane, registry = start_control_plane(Path(tmp) / "data")
        echo = ManagedProcess(
            [
                sys.executable,
                str(ROOT / "examples/echo/server.py"),
                "--registry",
                registry,
                "--instance-id",
                "b1",
            ],
            env=python_env(),
        )
        try:
            address = echo.wait_for_address()
            policy = MeshPolicy(default=ServicePolicy(method=MethodPolicy(idempotent=True)))
            async with (
                grpc.aio.insecure_channel(address) as raw_channel,
                Mesh(registry, policy=policy) as mesh,
            ):
                raw = echo_pb2_grpc.EchoStub(raw_channel)
                meshed = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
                await mesh.wait_for_instances("echo", 1)

                async def raw_call() -> Any:
                    return await raw.Echo(REQUEST)

                async def mesh_call() -> Any:
                    return await meshed.Echo(REQUEST)

                for call in (raw_call, mesh_call):  # warm-up: connections, caches
                    await throughput(call, 0.5)
                figures: dict[str, list[float]] = {
                    k: [] for k in ("raw_tps", "mesh_tps", "raw_p50", "mesh_p50")
                }
                # Per kind: client CPU s, server CPU s, calls, over every throughput slice.
                cpu = {kind: [0.0, 0.0, 0] for kind in ("raw", "mesh")}
                for round_number in range(args.rounds):
                    # Alternate which goes first so neither always follows the other.
                    order = [("raw", raw_call), ("mesh", mesh_call)]
                    for kind, call in order if round_number % 2 == 0 else order[::-1]:
                        client_before, server_before = cpu_seconds(None), cpu_seconds(echo.pid)
                        calls, elapsed = await calls_in(call, args.seconds)
                        cpu[kind][0] += cpu_seconds(None) - client_before
                        cpu[kind][1] += cpu_seconds(echo.pid) - server_before
                        cpu[kind][2] += calls
                        figures[f"{kind}_tps"].append(calls / elapsed)
                        figures[f"{kind}_p50"].append(await p50_ms(call, args.calls))
        finally:
            echo.kill()
            plane.kill()
    med = {key: statistics.median(values) for key, values in figures.items()}
    client_us = {kind: c / n * 1e6 for kind, (c, _, n) in cpu.items()}
    server_us = {kind: s / n * 1e6 for kind, (_, s, n) in cpu.items()}
    return {
        "throughput_ratio": round(med["mesh_tps"] / med["raw_tps"], 3),
        "p50_ratio": round(med["mesh_p50"] / med["raw_p50"], 3),
        "client_cpu_ratio": round(client_us["mesh"] / client_us["raw"], 3),
        "raw_client_cpu_us_per_call": round(client_us["raw"], 1),
        "mesh_client_cpu_us_per_call": round(client_us["mesh"], 1),
        "raw_server_cpu_us_per_call": round(server_us["raw"], 1),
        "mesh_server_cpu_us_per_call": round(server_us["mesh"], 1),
        "raw_throughput_per_s": round(med["raw_tps"], 1),
        "mesh_throughput_per_s": round(med["mesh_tps"], 1),
        "raw_p50_ms": round(med["raw_p50"], 4),
        "mesh_p50_ms": round(med["mesh_p50"], 4),
        "rounds": args.rounds,
        "in_flight": 32,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument(
        "--no-tracing", action="store_true", help="skip the tracing-on vs tracing-off run (bench_tracing.py)"
    )
    parser.add_argument("--serve-hosts", nargs=2, metavar=("REGISTRY", "ENDPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_hosts:
        asyncio.run(serve_hosts(*args.serve_hosts))
        return
    figures = asyncio.run(run(args))
    if not args.no_tracing:
        figures.update(tracing_figures())
        figures.update(asyncio.run(mesh_tracing_figures(args)))
    print(json.dumps(figures), flush=True)


def tracing_figures() -> dict[str, Any]:
    """Tracing and metrics on vs off on the same echo service (bench_tracing.py, real OTLP export)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_tracing.py"), "--rounds", "8", "--floor"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    traced = json.loads(result.stdout.strip().splitlines()[-1])
    return {
        "tracing_throughput_ratio": traced["tracing_throughput_ratio"],
        "tracing_cpu_throughput_ratio": traced.get("cpu_throughput_ratio"),
        # The same run's floor: the three propagation headers alone, no spans or metrics.
        "propagation_floor_ratio": traced.get("propagation_floor_ratio"),
        "propagation_floor_cpu_ratio": traced.get("propagation_floor_cpu_ratio"),
    }


def _server_telemetry(endpoint: str) -> Any:
    """The traced host's telemetry: spans to the OTLP receiver, metrics for an unscraped endpoint."""
    from rpcmesh.telemetry import TelemetryConfig, setup_telemetry

    # Metrics are recorded for a Prometheus endpoint nobody scrapes: recording is the per-call cost.
    return setup_telemetry(
        TelemetryConfig(
            service_name="echo-traced",
            traces_exporters=("otlp",),
            otlp_traces_endpoint=endpoint,
            metrics_exporters=("prometheus",),
            prometheus_port=0,
        ),
        install=False,
    )


async def serve_hosts(registry: str, endpoint: str) -> None:
    """Child process: an untraced ``echo`` and a traced ``echo-traced`` ServiceHost, one event loop.

    SIGUSR1 flushes the traced host's span pipeline and prints ``flushed``; SIGTERM stops.
    """
    from bench_tracing import BenchEchoServicer

    from rpcmesh.host import ServiceHost, ServiceHostConfig

    telemetry = _server_telemetry(endpoint)
    hosts: list[ServiceHost] = []
    for name, handle in (("echo", None), ("echo-traced", telemetry)):
        config = ServiceHostConfig(service=name, registry=registry, instance_id=f"{name}-1")
        host = ServiceHost(config, telemetry=handle)
        host.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, BenchEchoServicer(f"{name}-1"))
        await host.start()
        hosts.append(host)
    print(f"listening on {','.join(host.address for host in hosts)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def flush() -> None:
        telemetry.force_flush()
        print("flushed", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, flush)
    await stop.wait()
    for host in hosts:
        await host.stop(0)
    telemetry.shutdown()


def _start_hosts(registry: str, endpoint: str) -> subprocess.Popen[str]:
    """The ``--serve-hosts`` child, once it serves."""
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve-hosts", registry, endpoint],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=python_env(),
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    if "listening on" not in line:
        server.kill()
        server.wait()
        raise RuntimeError(f"bench hosts did not start: {line!r}")
    return server


async def mesh_tracing_figures(args: argparse.Namespace) -> dict[str, Any]:
    """The mesh path with telemetry on vs off: both hosts in one server process, two meshes."""
    from bench_tracing import _flush

    from rpcmesh.telemetry import TelemetryConfig, setup_telemetry

    receiver, endpoint = start_collector()
    client_telemetry = setup_telemetry(
        TelemetryConfig(
            service_name="bench-client",
            traces_exporters=("otlp",),
            otlp_traces_endpoint=endpoint,
            metrics_exporters=("prometheus",),
            prometheus_port=0,
        ),
        install=False,
    )
    plane: ManagedProcess | None = None
    server: subprocess.Popen[str] | None = None
    rates: dict[str, list[float]] = {"off": [], "on": []}
    cpu = {mode: [0.0, 0.0, 0.0] for mode in rates}  # client s, server s, calls
    try:
        with tempfile.TemporaryDirectory() as tmp:
            plane, registry = start_control_plane(Path(tmp) / "data")
            server = _start_hosts(registry, endpoint)
            policy = MeshPolicy(default=ServicePolicy(method=MethodPolicy(idempotent=True)))
            async with (
                Mesh(registry, policy=policy) as plain_mesh,
                Mesh(registry, policy=policy, telemetry=client_telemetry) as traced_mesh,
            ):
                stubs = {
                    "off": echo_pb2_grpc.EchoStub(plain_mesh.channel("echo")),
                    "on": echo_pb2_grpc.EchoStub(traced_mesh.channel("echo-traced")),
                }
                await plain_mesh.wait_for_instances("echo", 1)
                await traced_mesh.wait_for_instances("echo-traced", 1)
                for stub in stubs.values():  # warm-up: connections, caches
                    await throughput(lambda stub=stub: stub.Echo(REQUEST), 0.5)
                _flush([client_telemetry], server)
                for round_number in range(args.rounds):
                    order = ["off", "on"] if round_number % 2 == 0 else ["on", "off"]
                    for mode in order:
                        stub = stubs[mode]
                        client_before, server_before = cpu_seconds(None), cpu_seconds(server.pid)
                        started = time.perf_counter()
                        calls, _ = await calls_in(lambda stub=stub: stub.Echo(REQUEST), args.seconds)
                        # Both sides export the window's spans before the window ends (and "off"
                        # pays the same signal round trip): export work is charged where it belongs.
                        _flush([client_telemetry], server)
                        elapsed = time.perf_counter() - started
                        cpu[mode][0] += cpu_seconds(None) - client_before
                        cpu[mode][1] += cpu_seconds(server.pid) - server_before
                        cpu[mode][2] += calls
                        rates[mode].append(calls / elapsed)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if plane is not None:
            plane.kill()
        client_telemetry.shutdown()
        spans = stop_collector(receiver)
    paired = [on / off for on, off in zip(rates["on"], rates["off"], strict=True)]
    per_call = {mode: (c / n * 1e6, s / n * 1e6) for mode, (c, s, n) in cpu.items()}
    return {
        "mesh_tracing_throughput_ratio": round(statistics.median(paired), 3),
        "mesh_tracing_cpu_ratio": round(max(per_call["off"]) / max(per_call["on"]), 3),
        "mesh_off_calls_per_s": round(statistics.median(rates["off"]), 1),
        "mesh_on_calls_per_s": round(statistics.median(rates["on"]), 1),
        "mesh_cpu_us_per_call": {
            f"{mode}_{side}": round(value, 1)
            for mode, values in per_call.items()
            for side, value in zip(("client", "server"), values, strict=True)
        },
        "mesh_traced_spans_received": spans,
    }


if __name__ == "__main__":
    main()
