"""Registry benchmark: 10,000 instances over 500 services on a real `rpcmesh up` process.

Measures Resolve latency over gRPC (p50/p99), watch propagation latency
(deregister -> DELETE seen by each of 5 watchers, p50/p99) and the control
plane's RSS. The baseline is a grpc.health.v1 Check on the same server in the
same run, so ratios say how much the Registry adds to a bare gRPC round trip.
Prints one JSON line at the end.

    .venv/bin/python bench/bench_registry.py [--instances 10000] [--services 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def register_all(
    stub: registry_pb2_grpc.RegistryStub, instances: int, services: int
) -> list[tuple[str, str, str]]:
    semaphore = asyncio.Semaphore(200)
    ttl = duration_pb2.Duration(seconds=3600)

    async def one(index: int) -> tuple[str, str, str]:
        service = f"svc-{index % services:03d}"
        request = registry_pb2.RegisterRequest(
            instance=registry_pb2.Instance(
                service=service,
                address=f"10.{index // 65000}.{(index // 250) % 256}.{index % 250 + 1}:{1000 + index}",
                zone=f"zone-{index % 3}",
                version="1.0",
                tags=["grpc", f"shard-{index % 8}"],
                metadata={"team": "bench"},
            ),
            ttl=ttl,
        )
        async with semaphore:
            response = await stub.Register(request)
        return service, response.instance_id, response.lease_token

    return list(await asyncio.gather(*(one(i) for i in range(instances))))


async def timed(calls: int, call: object) -> list[float]:
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()  # type: ignore[operator]
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def run(
    address: str, pid: int, instances: int, services: int, calls: int, deletes: int
) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        started = time.perf_counter()
        registered = await register_all(stub, instances, services)
        register_s = time.perf_counter() - started
        rng = random.Random(1)

        async def resolve() -> None:
            await stub.Resolve(registry_pb2.ResolveRequest(service=f"svc-{rng.randrange(services):03d}"))

        async def check() -> None:
            await health.Check(health_pb2.HealthCheckRequest())

        await timed(200, resolve)  # warm-up
        await timed(200, check)
        resolve_ms = await timed(calls, resolve)
        baseline_ms = await timed(calls, check)

        revision = (await stub.ListServices(registry_pb2.ListServicesRequest(page_size=1))).revision
        watchers = [stub.Watch(registry_pb2.WatchRequest(after_revision=revision)) for _ in range(5)]
        sent: dict[str, float] = {}
        seen: list[float] = []
        done = asyncio.Event()
        remaining = [deletes * len(watchers)]

        async def follow(watch: grpc.aio.UnaryStreamCall) -> None:  # type: ignore[type-arg]
            async for response in watch:
                now = time.perf_counter()
                for event in response.events:
                    if (
                        event.type == registry_pb2.WATCH_EVENT_TYPE_DELETE
                        and event.instance.instance_id in sent
                    ):
                        seen.append((now - sent[event.instance.instance_id]) * 1000)
                        remaining[0] -= 1
                if remaining[0] <= 0:
                    done.set()
                    return

        followers = [asyncio.create_task(follow(watch)) for watch in watchers]
        await asyncio.sleep(0.5)
        for service, instance_id, token in rng.sample(registered, deletes):
            sent[instance_id] = time.perf_counter()
            await stub.Deregister(
                registry_pb2.DeregisterRequest(service=service, instance_id=instance_id, lease_token=token)
            )
        await asyncio.wait_for(done.wait(), 60)
        for watch in watchers:
            watch.cancel()
        await asyncio.gather(*followers, return_exceptions=True)

        resolve_p99 = percentile(resolve_ms, 0.99)
        baseline_p99 = percentile(baseline_ms, 0.99)
        return {
            "instances": instances,
            "services": services,
            "register_per_s": round(instances / register_s, 1),
            "resolve_p50_ms": round(percentile(resolve_ms, 0.5), 3),
            "resolve_p99_ms": round(resolve_p99, 3),
            "baseline_health_p50_ms": round(percentile(baseline_ms, 0.5), 3),
            "baseline_health_p99_ms": round(baseline_p99, 3),
            "resolve_vs_baseline_p50": round(
                statistics.median(resolve_ms) / statistics.median(baseline_ms), 2
            ),
            "watch_p50_ms": round(percentile(seen, 0.5), 3),
            "watch_p99_ms": round(percentile(seen, 0.99), 3),
            "watch_vs_baseline_p50": round(statistics.median(seen) / statistics.median(baseline_ms), 2),
            "rss_mb": round(rss_mb(pid), 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=500)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--deletes", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "rpcmesh", "up", "--port", "0", "--data-dir", data],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            address = ""
            for line in proc.stdout:
                match = re.search(r"listening on (\S+:\d+)", line)
                if match:
                    address = match.group(1)
                    break
            if not address:
                raise SystemExit(f"rpcmesh up did not start (exit {proc.wait()})")
            figures = asyncio.run(
                run(address, proc.pid, args.instances, args.services, args.calls, args.deletes)
            )
        finally:
            proc.kill()
            proc.wait()
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
