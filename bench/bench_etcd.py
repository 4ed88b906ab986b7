"""The etcd peer of the Registry benchmark: a real `etcd` (Debian `etcd-server`) driven from Python.

Starts ``etcd`` on free ports with its own temporary data directory (default
durability: every write fsynced to its WAL) and drives it through ``aetcd``'s
generated gRPC stubs, the way a service registry built on etcd works:

- register: ``LeaseGrant`` + ``Put /svc/<service>/<id>`` with the lease (the
  value is the instance as JSON, the same fields rpcmesh stores);
- keep alive: ``LeaseKeepAlive`` streams, one request per lease;
- resolve: ``Range`` over the prefix ``/svc/<service>/``;
- watch: ``Watch`` over ``/svc/``; deregister: ``LeaseRevoke`` (deletes the key).

``bench/bench_registry.py --peer etcd`` imports :class:`EtcdSide` and alternates
its rounds with rpcmesh's. Run alone it measures etcd only and prints one JSON line:

    .venv/bin/python bench/bench_etcd.py [--instances 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import grpc.aio


def free_port() -> int:
    """A port nothing listens on right now (etcd has no port 0 of its own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def etcd_binary() -> str | None:
    return shutil.which("etcd")


@contextlib.contextmanager
def etcd_server() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run a one-member etcd on free ports in a temporary data dir; yields (process, host:port)."""
    binary = etcd_binary()
    if binary is None:
        raise RuntimeError("etcd is not installed (Debian: apt-get install etcd-server)")
    with tempfile.TemporaryDirectory(prefix="bench-etcd-") as data:
        client, peer = free_port(), free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--name=bench",
                f"--data-dir={data}",
                f"--listen-client-urls=http://127.0.0.1:{client}",
                f"--advertise-client-urls=http://127.0.0.1:{client}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=bench=http://127.0.0.1:{peer}",
                "--logger=zap",
                "--log-level=error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", client), 0.2):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"etcd did not start (exit {proc.poll()})")
                time.sleep(0.05)
            yield proc, f"127.0.0.1:{client}"
        finally:
            proc.kill()
            proc.wait()


def instance_json(index: int, service: str) -> bytes:
    """The same instance fields rpcmesh's bench registers, as an etcd-based registry would store them."""
    return json.dumps(
        {
            "service": service,
            "address": f"10.{index // 65000}.{(index // 250) % 256}.{index % 250 + 1}:{1000 + index}",
            "zone": f"zone-{index % 3}",
            "version": "1.0",
            "tags": ["grpc", f"shard-{index % 8}"],
            "metadata": {"team": "bench"},
        }
    ).encode()


class EtcdSide:
    """One benchmark client of etcd; the same operations as bench_registry's RpcmeshSide."""

    name = "etcd"

    def __init__(self, address: str, pid: int) -> None:
        from aetcd import rpc

        self.rpc = rpc
        self.address = address
        self.pid = pid
        self.channel = grpc.aio.insecure_channel(address)
        self.kv = rpc.KVStub(self.channel)
        self.lease = rpc.LeaseStub(self.channel)
        self.watch_stub = rpc.WatchStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def register(self, index: int, service: str, ttl_s: int) -> tuple[str, int]:
        """Grant a lease and put the instance under it; returns (key, lease id)."""
        lease = await self.lease.LeaseGrant(self.rpc.LeaseGrantRequest(TTL=ttl_s))
        key = f"/svc/{service}/i-{index:06d}"
        await self.kv.Put(
            self.rpc.PutRequest(key=key.encode(), value=instance_json(index, service), lease=lease.ID)
        )
        return key, lease.ID

    async def renew(self, leases: list[int], streams: int = 8) -> None:
        """Renew every lease once over ``streams`` LeaseKeepAlive streams."""

        async def one(part: list[int]) -> None:
            requests = [self.rpc.LeaseKeepAliveRequest(ID=lease) for lease in part]
            replies = 0
            async for reply in self.lease.LeaseKeepAlive(iter(requests)):
                if reply.TTL <= 0:
                    raise RuntimeError(f"lease {reply.ID} was not renewed")
                replies += 1
                if replies == len(part):
                    break

        await asyncio.gather(*(one(leases[i::streams]) for i in range(streams)))

    async def resolve(self, service: str) -> int:
        prefix = f"/svc/{service}/".encode()
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        response = await self.kv.Range(self.rpc.RangeRequest(key=prefix, range_end=end))
        return len(response.kvs)

    async def deregister(self, key: str, lease: int) -> None:
        del key
        await self.lease.LeaseRevoke(self.rpc.LeaseRevokeRequest(ID=lease))

    async def watch_deletes(self, ready: asyncio.Event) -> AsyncIterator[list[str]]:
        """One watcher of every instance; yields the keys of each response's DELETE events."""
        create = self.rpc.WatchRequest(
            create_request=self.rpc.WatchCreateRequest(key=b"/svc/", range_end=b"/svc0")
        )
        queue: asyncio.Queue[object] = asyncio.Queue()
        await queue.put(create)

        async def requests() -> AsyncIterator[object]:
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item

        call = self.watch_stub.Watch(requests())
        try:
            async for response in call:
                if response.created:
                    ready.set()
                    continue
                deleted = [
                    event.kv.key.decode() for event in response.events if event.type == self.rpc.Event.DELETE
                ]
                if deleted:
                    yield deleted
        finally:
            call.cancel()


async def standalone(address: str, pid: int, instances: int, services: int) -> dict[str, float]:
    """Etcd alone: register, renew, resolve; the paired figures come from bench_registry.py --peer etcd."""
    side = EtcdSide(address, pid)
    try:
        semaphore = asyncio.Semaphore(200)

        async def one(index: int) -> tuple[str, int]:
            async with semaphore:
                return await side.register(index, f"svc-{index % services:03d}", 3600)

        began = time.perf_counter()
        registered = await asyncio.gather(*(one(i) for i in range(instances)))
        register_per_s = instances / (time.perf_counter() - began)
        began = time.perf_counter()
        await side.renew([lease for _, lease in registered])
        renew_per_s = instances / (time.perf_counter() - began)
        samples = []
        for index in range(2000):
            start = time.perf_counter()
            await side.resolve(f"svc-{index % services:03d}")
            samples.append((time.perf_counter() - start) * 1000)
        samples.sort()
        return {
            "register_per_s": round(register_per_s, 1),
            "renew_per_s": round(renew_per_s, 1),
            "resolve_p50_ms": round(samples[len(samples) // 2], 3),
            "resolve_p99_ms": round(samples[int(len(samples) * 0.99)], 3),
        }
    finally:
        await side.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=500)
    args = parser.parse_args()
    with etcd_server() as (proc, address):
        figures = asyncio.run(standalone(address, proc.pid, args.instances, args.services))
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
