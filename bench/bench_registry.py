"""Registry benchmark: 10,000 instances over 500 services on a real `rpcmesh up` process, and its etcd peer.

In one run, against ``rpcmesh up`` (embedded SQLite by default; ``--store
postgresql`` puts it on a fresh database of the local PostgreSQL) and, with
``--peer etcd``, a real ``etcd`` (see ``bench_etcd.py``) loaded with the same
10,000 instances, each with its own lease:

- register: 10,000 registrations from 200 concurrent clients (registrations/s),
  in five chunks alternating between the systems, and the server's CPU per registration;
- RSS of the server process once the 10,000 instances are registered (and
  before, empty: ``rss_idle_mb``);
- keep-alive: every lease renewed once per round over 8 streams; the server's
  CPU time (user + system, ``/proc``) per renewal;
- resolve: sequential Resolves of a random service (etcd: a prefix Range),
  p50/p99, with a ``grpc.health.v1`` Check baseline on rpcmesh's server;
- watch under churn: 100 watchers of every service (in a separate process, so
  that decoding their events does not delay the deregistrations) while one
  burst of 1,000 deregistrations (etcd: lease revocations) is sent 100 at a
  time; latency = a watcher sees the DELETE - its deregistration was sent
  (``watch_p99_ms``), or - its deregistration was acknowledged
  (``watch_after_ack_p99_ms``: propagation of a committed change).

Rounds alternate between the systems (the order flips every round) after a
warm-up of both, and the figures are medians over the rounds (the watch p99 is
the median of each round's p99 over 100,000 watcher events). Prints one JSON line.

    .venv/bin/python bench/bench_registry.py [--peer etcd] [--store postgresql] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_etcd import EtcdSide, etcd_binary, etcd_server  # noqa: E402
from bench_saga import postgres_database  # noqa: E402
from process_cpu import cpu_seconds  # noqa: E402

from tests.support.processes import start_control_plane  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Side(Protocol):
    name: str
    pid: int

    async def register(self, index: int, service: str, ttl_s: int) -> tuple[str, Any]: ...
    async def renew(self, leases: list[Any], streams: int = 8) -> None: ...
    async def resolve(self, service: str) -> int: ...
    async def deregister(self, key: str, lease: Any) -> None: ...
    def watch_deletes(self, ready: asyncio.Event) -> AsyncIterator[list[str]]: ...
    async def close(self) -> None: ...


class RpcmeshSide:
    """The rpcmesh Registry: Register with a TTL, KeepAlive streams, Resolve, Watch, Deregister."""

    name = "rpcmesh"

    def __init__(self, address: str, pid: int) -> None:
        self.address = address
        self.pid = pid
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def register(self, index: int, service: str, ttl_s: int) -> tuple[str, tuple[str, str, str]]:
        response = await self.stub.Register(
            registry_pb2.RegisterRequest(
                instance=registry_pb2.Instance(
                    service=service,
                    address=f"10.{index // 65000}.{(index // 250) % 256}.{index % 250 + 1}:{1000 + index}",
                    zone=f"zone-{index % 3}",
                    version="1.0",
                    tags=["grpc", f"shard-{index % 8}"],
                    metadata={"team": "bench"},
                ),
                ttl=duration_pb2.Duration(seconds=ttl_s),
            )
        )
        return response.instance_id, (service, response.lease_id, response.lease_token)

    async def renew(self, leases: list[tuple[str, str, str]], streams: int = 8) -> None:
        async def one(part: list[tuple[str, str, str]]) -> None:
            requests = [
                registry_pb2.KeepAliveRequest(lease_id=lease, lease_token=token) for _, lease, token in part
            ]
            replies = 0
            async for reply in self.stub.KeepAlive(iter(requests)):
                if reply.code != 0:
                    raise RuntimeError(f"lease {reply.lease_id} was not renewed: {reply.message}")
                replies += 1
                if replies == len(part):
                    break

        await asyncio.gather(*(one(leases[i::streams]) for i in range(streams)))

    async def resolve(self, service: str) -> int:
        return len((await self.stub.Resolve(registry_pb2.ResolveRequest(service=service))).instances)

    async def check(self) -> None:
        await self.health.Check(health_pb2.HealthCheckRequest())

    async def deregister(self, key: str, lease: tuple[str, str, str]) -> None:
        service, _, token = lease
        await self.stub.Deregister(
            registry_pb2.DeregisterRequest(service=service, instance_id=key, lease_token=token)
        )

    async def watch_deletes(self, ready: asyncio.Event) -> AsyncIterator[list[str]]:
        revision = (await self.stub.ListServices(registry_pb2.ListServicesRequest(page_size=1))).revision
        call = self.stub.Watch(registry_pb2.WatchRequest(after_revision=revision))
        ready.set()  # no snapshot after a revision: the stream is open once the call is sent
        try:
            async for response in call:
                deleted = [
                    event.instance.instance_id
                    for event in response.events
                    if event.type == registry_pb2.WATCH_EVENT_TYPE_DELETE
                ]
                if deleted:
                    yield deleted
        finally:
            call.cancel()


def make_side(kind: str, address: str, pid: int) -> Side:
    return EtcdSide(address, pid) if kind == "etcd" else RpcmeshSide(address, pid)


# --- the watchers' process -------------------------------------------------------------------


def watcher_process(
    kind: str, address: str, watchers: int, conn: multiprocessing.connection.Connection
) -> None:
    """Child process: ``watchers`` watch streams; per burst, the time each one saw each DELETE."""
    asyncio.run(_watch(kind, address, watchers, conn))


async def _watch(kind: str, address: str, watchers: int, conn: multiprocessing.connection.Connection) -> None:
    side = make_side(kind, address, 0)
    seen: list[list[tuple[str, float]]] = [[] for _ in range(watchers)]
    readies = [asyncio.Event() for _ in range(watchers)]

    expected = [0]
    enough = asyncio.Event()

    def check() -> None:
        if expected[0] and all(len(s) >= expected[0] for s in seen):
            enough.set()

    async def follow(index: int) -> None:
        async for keys in side.watch_deletes(readies[index]):
            now = time.perf_counter()
            seen[index].extend((key, now) for key in keys)
            check()

    tasks = [asyncio.create_task(follow(i)) for i in range(watchers)]
    await asyncio.gather(*(ready.wait() for ready in readies))
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    conn.send("ready")
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command is None:
            break
        expected[0] = command
        check()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough.wait(), 120)
        enough.clear()
        expected[0] = 0
        conn.send([pair for s in seen for pair in s])
        for s in seen:
            s.clear()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await side.close()


@contextlib.contextmanager
def watcher_child(
    kind: str, address: str, watchers: int
) -> Iterator[tuple[multiprocessing.connection.Connection, int]]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    proc = context.Process(target=watcher_process, args=(kind, address, watchers, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(60) or parent.recv() != "ready":
            raise RuntimeError(f"{kind} watchers did not start")
        assert proc.pid is not None
        yield parent, proc.pid
        parent.send(None)
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()


# --- the rounds ---------------------------------------------------------------------------


async def timed(calls: int, call: Any) -> list[float]:
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def register_range(side: Side, indexes: range, services: int) -> list[tuple[str, Any]]:
    """Register the instances ``indexes`` from 200 concurrent clients."""
    semaphore = asyncio.Semaphore(200)

    async def one(index: int) -> tuple[str, Any]:
        async with semaphore:
            return await side.register(index, f"svc-{index % services:03d}", 3600)

    return list(await asyncio.gather(*(one(i) for i in indexes)))


async def burst(
    side: Side, conn: multiprocessing.connection.Connection, victims: list[tuple[str, Any]], watchers: int
) -> tuple[list[float], list[float]]:
    """Deregister ``victims`` 100 at a time; latencies (ms) of every watcher's DELETE.

    Two clocks: from the deregistration's send (includes its own wait behind the
    burst's other writes) and from its acknowledgement (propagation proper: the
    change is committed; 0 when a watcher saw it before the writer's answer came).
    """
    sent: dict[str, float] = {}
    acked: dict[str, float] = {}
    semaphore = asyncio.Semaphore(100)

    async def one(key: str, lease: Any) -> None:
        async with semaphore:
            sent[key] = time.perf_counter()
            await side.deregister(key, lease)
            acked[key] = time.perf_counter()

    await asyncio.gather(*(one(key, lease) for key, lease in victims))
    loop = asyncio.get_running_loop()
    conn.send(len(victims))
    pairs: list[tuple[str, float]] = await loop.run_in_executor(None, conn.recv)
    from_send = [(at - sent[key]) * 1000 for key, at in pairs if key in sent]
    from_ack = [max(0.0, at - acked[key]) * 1000 for key, at in pairs if key in acked]
    if len(from_send) < len(victims) * watchers:
        raise RuntimeError(f"{side.name}: {len(from_send)} of {len(victims) * watchers} DELETE events seen")
    return from_send, from_ack


async def run(args: argparse.Namespace, servers: dict[str, tuple[str, int]]) -> dict[str, Any]:
    sides: dict[str, Side] = {kind: make_side(kind, address, pid) for kind, (address, pid) in servers.items()}
    per: dict[str, dict[str, list[float]]] = {kind: {} for kind in sides}
    registered: dict[str, list[tuple[str, Any]]] = {}
    rng = random.Random(1)

    def add(kind: str, key: str, value: float) -> None:
        per[kind].setdefault(key, []).append(value)

    try:
        seconds = dict.fromkeys(sides, 0.0)
        cpu_used = dict.fromkeys(sides, 0.0)
        for kind, side in sides.items():
            add(kind, "rss_idle_mb", rss_mb(side.pid))  # the empty server: what 10k instances add is the rest
            registered[kind] = []
        chunks = 5  # registration alternates too: a fifth of the instances at a time, the order flipping
        for chunk in range(chunks):
            indexes = range(chunk * args.instances // chunks, (chunk + 1) * args.instances // chunks)
            for kind in list(sides) if chunk % 2 == 0 else list(reversed(sides)):
                side = sides[kind]
                cpu, began = cpu_seconds(side.pid), time.perf_counter()
                registered[kind] += await register_range(side, indexes, args.services)
                seconds[kind] += time.perf_counter() - began
                cpu_used[kind] += cpu_seconds(side.pid) - cpu
        for kind in sides:
            add(kind, "register_per_s", args.instances / seconds[kind])
            add(kind, "register_server_cpu_us", cpu_used[kind] * 1e6 / args.instances)
        await asyncio.sleep(1)
        for kind, side in sides.items():
            add(kind, "rss_mb", rss_mb(side.pid))
            add(kind, "rss_added_mb", per[kind]["rss_mb"][0] - per[kind]["rss_idle_mb"][0])
        for side in sides.values():  # warm-up of both
            await timed(200, lambda s=side: s.resolve(f"svc-{rng.randrange(args.services):03d}"))
        mesh = sides["rpcmesh"]
        assert isinstance(mesh, RpcmeshSide)
        await timed(200, mesh.check)
        victims = {kind: rng.sample(registered[kind], args.burst * args.rounds) for kind in sides}
        with contextlib.ExitStack() as stack:
            conns = {
                kind: stack.enter_context(watcher_child(kind, servers[kind][0], args.watchers))
                for kind in sides
            }
            for round_ in range(args.rounds):
                order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
                for kind in order:
                    side = sides[kind]
                    samples = await timed(
                        args.calls, lambda s=side: s.resolve(f"svc-{rng.randrange(args.services):03d}")
                    )
                    add(kind, "resolve_p50_ms", percentile(samples, 0.5))
                    add(kind, "resolve_p99_ms", percentile(samples, 0.99))
                    if kind == "rpcmesh":
                        baseline = await timed(args.calls, mesh.check)
                        add(kind, "baseline_health_p50_ms", percentile(baseline, 0.5))
                        add(kind, "baseline_health_p99_ms", percentile(baseline, 0.99))
                    leases = [lease for _, lease in registered[kind]]
                    cpu = cpu_seconds(side.pid)
                    began = time.perf_counter()
                    await side.renew(leases)
                    add(kind, "renew_per_s", len(leases) / (time.perf_counter() - began))
                    add(kind, "renew_server_cpu_us", (cpu_seconds(side.pid) - cpu) * 1e6 / len(leases))
                    batch = victims[kind][round_ * args.burst : (round_ + 1) * args.burst]
                    conn, watcher_pid = conns[kind]
                    cpu, watcher_cpu = cpu_seconds(side.pid), cpu_seconds(watcher_pid)
                    latencies, after_ack = await burst(side, conn, batch, args.watchers)
                    add(kind, "burst_server_cpu_ms", (cpu_seconds(side.pid) - cpu) * 1000)
                    add(kind, "burst_watchers_cpu_ms", (cpu_seconds(watcher_pid) - watcher_cpu) * 1000)
                    gone = {key for key, _ in batch}
                    registered[kind] = [pair for pair in registered[kind] if pair[0] not in gone]
                    add(kind, "watch_p50_ms", percentile(latencies, 0.5))
                    add(kind, "watch_p99_ms", percentile(latencies, 0.99))
                    add(kind, "watch_max_ms", max(latencies))
                    add(kind, "watch_after_ack_p50_ms", percentile(after_ack, 0.5))
                    add(kind, "watch_after_ack_p99_ms", percentile(after_ack, 0.99))
    finally:
        for side in sides.values():
            await side.close()
    figures: dict[str, Any] = {
        "instances": args.instances,
        "services": args.services,
        "watchers": args.watchers,
        "burst": args.burst,
        "rounds": args.rounds,
        "store": args.store or "sqlite",
    }
    for key, values in per["rpcmesh"].items():
        figures[key] = round(statistics.median(values), 3)
    figures["resolve_vs_baseline_p50"] = round(
        figures["resolve_p50_ms"] / figures["baseline_health_p50_ms"], 2
    )
    if "etcd" in per:
        for key, values in per["etcd"].items():
            figures[f"etcd_{key}"] = round(statistics.median(values), 3)
        for key in (
            "resolve_p50_ms",
            "resolve_p99_ms",
            "watch_p99_ms",
            "watch_after_ack_p99_ms",
            "rss_mb",
            "renew_server_cpu_us",
        ):
            peer = figures[f"etcd_{key}"]
            name = key.removesuffix("_ms").removesuffix("_mb").removesuffix("_us")
            figures[f"{name}_vs_etcd"] = round(figures[key] / peer, 2) if peer else None
        figures["register_vs_etcd"] = round(figures["register_per_s"] / figures["etcd_register_per_s"], 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=500)
    parser.add_argument("--calls", type=int, default=1_000, help="Resolves per system per round")
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--burst", type=int, default=1_000, help="deregistrations per burst")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peer", choices=["none", "etcd"], default="none")
    parser.add_argument("--store", choices=["postgresql"], help="rpcmesh's store (default: embedded SQLite)")
    parser.add_argument("--bus", choices=["nats"], help="rpcmesh's Bus (default: embedded SQLite)")
    args = parser.parse_args()
    skipped = ""
    if args.peer == "etcd" and etcd_binary() is None:
        skipped = "etcd is not installed (apt-get install etcd-server); measured rpcmesh only"
        args.peer = "none"
    with contextlib.ExitStack() as stack:
        data = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        extra: list[str] = []
        if args.store:
            extra += ["--store", stack.enter_context(postgres_database("bench_registry"))]
        if args.bus:
            extra += ["--bus", "nats://127.0.0.1:4222"]
        plane, address = start_control_plane(data / "data", *extra)
        stack.callback(plane.kill)
        servers = {"rpcmesh": (address, plane.pid)}
        if args.peer == "etcd":
            etcd, etcd_address = stack.enter_context(etcd_server())
            servers["etcd"] = (etcd_address, etcd.pid)
        figures = asyncio.run(run(args, servers))
    if skipped:
        figures["skipped"] = skipped
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
