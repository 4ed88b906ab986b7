"""Control-plane per-call overhead: `rpcmesh up` as configured by default vs. the same servicers bare.

    .venv/bin/python bench/bench_controlplane.py [--seconds 1.5] [--rounds 5] [--inflight 16]

Two servers, each in its own child process, on SQLite files in a temporary folder:

- ``default``: a real ``rpcmesh up --port 0`` (plaintext, authentication off, telemetry off: the
  default configuration), with its server stack as ``ControlPlane`` builds it.
- ``raw``: this file in ``--serve-raw`` mode: the same components (``build_components``) on a plain
  ``grpc.aio.server()`` without interceptors or handler wrappers (same transport options), so
  the difference is the server stack alone.

The client (this process) alternates between the two servers round after round and case after
case, and takes medians over rounds. Cases:

- ``resolve``: unary ``Registry/Resolve`` of a service with 3 instances;
- ``append``: unary ``EventStore/AppendToStream`` of one small event (SQLite, synchronous=FULL);
- ``subscribe``: server-streaming ``EventStore/SubscribeToStream`` over a 10-event stream: open,
  read the 10 catch-up events (in as many messages as the server sends), cancel.

Server CPU per call comes from ``/proc/<pid>/stat`` (user + system) over each measured window,
so the figure covers everything the server does for a call, grpc core included. Prints one JSON
line: ``interceptor_overhead_ratio`` (default ÷ raw server CPU per Resolve call), the per-call
microseconds of every case and server, calls/s, and ``overhead_us_per_call`` (default - raw).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
from google.protobuf import duration_pb2  # noqa: E402
from process_cpu import cpu_seconds  # noqa: E402
from rpcmesh.v1 import eventstore_pb2, eventstore_pb2_grpc, registry_pb2, registry_pb2_grpc  # noqa: E402

STREAM_EVENTS = 10


async def serve_raw(data_dir: Path) -> None:
    """The control plane's components on a grpc.aio server without any wrapping."""
    from rpcmesh.controlplane.component import ControlPlaneContext
    from rpcmesh.controlplane.config import ControlPlaneConfig
    from rpcmesh.controlplane.server import build_components
    from rpcmesh.security.limits import Limits

    config = ControlPlaneConfig(port=0, data_dir=data_dir)
    # Every component `rpcmesh up` runs, so background work (bus flushes, saga recovery) is the same.
    components = build_components(config)
    server = grpc.aio.server(options=[*Limits().server_options(), ("grpc.so_reuseport", 0)])
    for component in components:
        component.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    context = ControlPlaneContext(config=config, address=address)
    for component in components:
        await component.start(context)
    await server.start()
    print(f"rpcmesh control plane listening on {address}", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(0.5)
        for component in reversed(components):
            await component.stop()


def _start(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "generated")])}
    for name in list(env):
        if name.startswith("OTEL_"):
            del env[name]  # the default configuration: telemetry off
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "listening on" in line:
            return proc, line.rsplit(" ", 1)[1].strip()
    proc.kill()
    raise RuntimeError(f"server did not start: {args}")


Call = Callable[[int], Awaitable[None]]


class Target:
    """Stubs of one server and the three cases as calls."""

    def __init__(self, name: str, address: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        self.channel = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        self.registry = registry_pb2_grpc.RegistryStub(self.channel)
        self.events = eventstore_pb2_grpc.EventStoreStub(self.channel)

    async def prepare(self) -> None:
        for index in range(3):
            await self.registry.Register(
                registry_pb2.RegisterRequest(
                    instance=registry_pb2.Instance(
                        service="bench", instance_id=f"b-{index}", address=f"127.0.0.1:{9000 + index}"
                    ),
                    ttl=duration_pb2.Duration(seconds=3600),
                ),
                timeout=10,
            )
        await self.events.AppendToStream(
            eventstore_pb2.AppendToStreamRequest(
                stream="bench-read",
                expected_state=eventstore_pb2.EXPECTED_STATE_ANY,
                events=[
                    eventstore_pb2.EventData(event_type="Filled", data=b"x" * 100)
                    for _ in range(STREAM_EVENTS)
                ],
            ),
            timeout=10,
        )

    async def resolve(self, worker: int) -> None:
        await self.registry.Resolve(registry_pb2.ResolveRequest(service="bench"), timeout=10)

    async def append(self, worker: int) -> None:
        await self.events.AppendToStream(
            eventstore_pb2.AppendToStreamRequest(
                stream=f"bench-{worker}",
                expected_state=eventstore_pb2.EXPECTED_STATE_ANY,
                events=[eventstore_pb2.EventData(event_type="Ticked", data=b"y" * 100)],
            ),
            timeout=10,
        )

    async def subscribe(self, worker: int) -> None:
        call = self.events.SubscribeToStream(
            eventstore_pb2.SubscribeToStreamRequest(stream="bench-read", after_revision=-1), timeout=10
        )
        seen = 0
        async for response in call:
            seen += len(response.events)
            if response.caught_up or seen >= STREAM_EVENTS:
                break
        call.cancel()


async def _window(target: Target, call: Call, seconds: float, inflight: int) -> tuple[float, float]:
    """Calls/s and server CPU µs per call over one window."""
    count = 0
    stop = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await call(index)
            count += 1

    cpu_before = cpu_seconds(target.pid)
    started = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(inflight)))
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(target.pid) - cpu_before
    return count / elapsed, cpu / max(count, 1) * 1e6


async def run(seconds: float, rounds: int, inflight: int, data: Path) -> dict[str, object]:
    default_proc, default_address = _start(
        [sys.executable, "-m", "rpcmesh", "up", "--port", "0", "--data-dir", str(data / "default")]
    )
    raw_proc, raw_address = _start([sys.executable, __file__, "--serve-raw", str(data / "raw")])
    targets = [Target("default", default_address, default_proc.pid), Target("raw", raw_address, raw_proc.pid)]
    cases = ["resolve", "append", "subscribe"]
    rate: dict[tuple[str, str], list[float]] = {(t.name, c): [] for t in targets for c in cases}
    cpu: dict[tuple[str, str], list[float]] = {(t.name, c): [] for t in targets for c in cases}
    try:
        for target in targets:
            await target.prepare()
            for case in cases:  # warm-up
                await _window(target, getattr(target, case), 0.3, inflight)
        for round_index in range(rounds):
            for case in cases:
                # Alternate which server goes first so drift in machine load evens out.
                order = targets if round_index % 2 == 0 else list(reversed(targets))
                for target in order:
                    calls_per_s, us = await _window(target, getattr(target, case), seconds, inflight)
                    rate[(target.name, case)].append(calls_per_s)
                    cpu[(target.name, case)].append(us)
    finally:
        for target in targets:
            await target.channel.close()
        for proc in (default_proc, raw_proc):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    figures: dict[str, object] = {"seconds": seconds, "rounds": rounds, "inflight": inflight}
    for case in cases:
        for name in ("default", "raw"):
            figures[f"{case}_{name}_calls_per_s"] = round(statistics.median(rate[(name, case)]), 1)
            figures[f"{case}_{name}_server_cpu_us_per_call"] = round(statistics.median(cpu[(name, case)]), 1)
        overhead = statistics.median(
            d - r for d, r in zip(cpu[("default", case)], cpu[("raw", case)], strict=True)
        )
        figures[f"{case}_overhead_us_per_call"] = round(overhead, 1)
    figures["interceptor_overhead_ratio"] = round(
        statistics.median(
            d / r for d, r in zip(cpu[("default", "resolve")], cpu[("raw", "resolve")], strict=True)
        ),
        3,
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.5, help="length of one measured window")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inflight", type=int, default=16, help="concurrent calls per window")
    parser.add_argument("--serve-raw", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_raw is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_raw(args.serve_raw))
        return
    with tempfile.TemporaryDirectory(prefix="bench-controlplane-") as folder:
        figures = asyncio.run(run(args.seconds, args.rounds, args.inflight, Path(folder)))
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
