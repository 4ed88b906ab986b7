"""Benchmark: durable publish -> deliver -> ack of 100-byte messages, Bus (SQLite) vs NATS JetStream.

Run: ``.venv/bin/python bench/bench_bus.py [--messages 100000] [--nats nats://127.0.0.1:4222]``

In one run, on this machine:

1. Bus publish: a client streams batches of 1,000 messages over ``PublishStream``
   to a Bus (SQLite, WAL, synchronous=FULL) running in its own process; the rate
   counts until every batch is acknowledged as durable.
2. Bus deliver: a consumer group reads all of them from the earliest position
   and acks each message (acks batched on the stream); counted until the last
   delivery is received and acked.
3. JetStream publish: nats-py ``publish_async`` pipelined into a file-backed
   stream, counted until every PubAck arrived.
4. JetStream deliver: a durable pull consumer, ``fetch(1000)`` and an ack per message.
5. Latency: 1,000 msgs/s, each published on its own (the batching Publisher
   with no linger) for a few seconds; p50/p99 of publish -> delivery at the subscriber.

Prints one JSON line: rates, ``publish_ratio`` and ``deliver_ratio`` (Bus / JetStream)
and ``p99_ms_at_1k``.

``--backend nats`` runs the same phases against a Bus served on NATS JetStream
(``rpcmesh up --bus``: streams per topic, groups as durable pull consumers),
for the figures of the multi-node mode; the goals are for the default (SQLite).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc.aio  # noqa: E402
import nats  # noqa: E402
from nats.js import api  # noqa: E402
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc  # noqa: E402

from rpcmesh.bus import Publisher, PublisherConfig  # noqa: E402

PAYLOAD = b"x" * 100
BATCH = 1000


def serve(data_dir: str, bus: str | None) -> None:
    """Run a Bus-only control plane (the server side of the benchmark)."""
    from rpcmesh.controlplane.bus.component import BusComponent
    from rpcmesh.controlplane.config import ControlPlaneConfig
    from rpcmesh.controlplane.server import ControlPlane

    async def main() -> None:
        config = ControlPlaneConfig(port=0, data_dir=Path(data_dir), bus=bus)
        plane = ControlPlane(config, components=[BusComponent(config)])
        address = await plane.start()
        print(f"listening on {address}", flush=True)
        await plane.wait()

    asyncio.run(main())


async def bus_publish(stub: bus_pb2_grpc.BusStub, topic: str, count: int) -> float:
    batches = count // BATCH

    async def requests() -> AsyncIterator[bus_pb2.PublishStreamRequest]:
        for batch_id in range(batches):
            yield bus_pb2.PublishStreamRequest(
                topic=topic,
                batch_id=batch_id,
                messages=[bus_pb2.BusMessage(payload=PAYLOAD) for _ in range(BATCH)],
            )

    started = time.perf_counter()
    acked = 0
    async for response in stub.PublishStream(requests()):
        acked += len(response.results)
    elapsed = time.perf_counter() - started
    assert acked == batches * BATCH, acked
    return acked / elapsed


async def bus_deliver(stub: bus_pb2_grpc.BusStub, topic: str, count: int) -> float:
    queue: asyncio.Queue[bus_pb2.SubscribeRequest] = asyncio.Queue()
    options = bus_pb2.SubscriptionOptions(
        topic=topic, group="bench", mode=bus_pb2.DELIVERY_MODE_GROUP, max_in_flight=20_000, max_batch=1000
    )
    options.start.earliest = True
    queue.put_nowait(bus_pb2.SubscribeRequest(open=options))

    async def requests() -> AsyncIterator[bus_pb2.SubscribeRequest]:
        while True:
            yield await queue.get()

    call = stub.Subscribe(requests())
    received = 0
    started = time.perf_counter()
    async for response in call:
        if not response.deliveries:
            continue
        refs = [bus_pb2.MessageRef(topic=topic, sequence=d.message.sequence) for d in response.deliveries]
        queue.put_nowait(bus_pb2.SubscribeRequest(ack=bus_pb2.Ack(refs=refs)))
        received += len(refs)
        if received >= count:
            break
    elapsed = time.perf_counter() - started
    await asyncio.sleep(0.2)
    call.cancel()
    return received / elapsed


async def bus_latency(channel: grpc.aio.Channel, topic: str, seconds: float, rate: int) -> list[float]:
    stub = bus_pb2_grpc.BusStub(channel)
    queue: asyncio.Queue[bus_pb2.SubscribeRequest] = asyncio.Queue()
    options = bus_pb2.SubscriptionOptions(topic=topic, group="latency", mode=bus_pb2.DELIVERY_MODE_GROUP)
    options.start.new_only = True
    queue.put_nowait(bus_pb2.SubscribeRequest(open=options))

    async def requests() -> AsyncIterator[bus_pb2.SubscribeRequest]:
        while True:
            yield await queue.get()

    latencies: list[float] = []
    total = int(seconds * rate)
    call = stub.Subscribe(requests())
    first = await call.read()
    assert first.opened

    async def consume() -> None:
        while True:
            response = await call.read()
            now = time.perf_counter()
            refs = []
            for delivery in response.deliveries:
                (sent,) = struct.unpack("d", delivery.message.payload[:8])
                latencies.append((now - sent) * 1000)
                refs.append(bus_pb2.MessageRef(topic=topic, sequence=delivery.message.sequence))
            queue.put_nowait(bus_pb2.SubscribeRequest(ack=bus_pb2.Ack(refs=refs)))
            if len(latencies) >= total:
                return

    consumer = asyncio.create_task(consume())
    publisher = Publisher(channel, PublisherConfig(linger=0.0))
    started = time.perf_counter()
    pending: set[asyncio.Future[bus_pb2.PublishResult]] = set()
    for index in range(total):
        due = started + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        payload = struct.pack("d", time.perf_counter()) + PAYLOAD[8:]
        task = asyncio.ensure_future(publisher.publish(topic, payload))
        pending.add(task)
        task.add_done_callback(pending.discard)
    try:
        await asyncio.wait_for(consumer, 30)
    except TimeoutError:
        print("latency: got", len(latencies), "of", total, file=sys.stderr)
        raise
    await publisher.close()
    call.cancel()
    return latencies


async def jetstream(url: str, count: int) -> tuple[float, float]:
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=20_000)
    name = f"BENCH_{uuid.uuid4().hex[:8]}"
    subject = f"bench.{name}"
    await js.add_stream(name=name, subjects=[subject], storage=api.StorageType.FILE)
    try:
        started = time.perf_counter()
        futures = [await js.publish_async(subject, PAYLOAD) for _ in range(count)]
        await asyncio.gather(*futures)
        publish_rate = count / (time.perf_counter() - started)

        sub = await js.pull_subscribe(subject, durable="bench", stream=name)
        received = 0
        started = time.perf_counter()
        while received < count:
            messages = await sub.fetch(BATCH, timeout=5)
            for message in messages:
                await message.ack()
            received += len(messages)
        await nc.flush()
        deliver_rate = received / (time.perf_counter() - started)
        return publish_rate, deliver_rate
    finally:
        await js.delete_stream(name)
        await nc.close()


async def run(args: argparse.Namespace) -> dict[str, float | str]:
    prefix = f"bench{uuid.uuid4().hex[:8]}" if args.backend == "nats" else "bench"
    extra = ["--serve-bus", args.nats] if args.backend == "nats" else []
    with tempfile.TemporaryDirectory() as data_dir:
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            data_dir,
            *extra,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert server.stdout is not None
            line = (await server.stdout.readline()).decode()
            address = line.split("listening on ")[1].strip()
            channel = grpc.aio.insecure_channel(
                address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
            )
            stub = bus_pb2_grpc.BusStub(channel)
            bus_publish_rate = await bus_publish(stub, f"{prefix}.rate", args.messages)
            bus_deliver_rate = await bus_deliver(stub, f"{prefix}.rate", args.messages)
            latencies = await bus_latency(channel, f"{prefix}.latency", args.latency_seconds, 1000)
            await channel.close()
        finally:
            server.terminate()
            await asyncio.wait_for(server.wait(), 20)
            if args.backend == "nats":
                from rpcmesh.controlplane.bus.nats_store import NatsBusStore

                cleaner = NatsBusStore(args.nats)
                await cleaner.open()
                try:
                    await cleaner.purge_prefix(prefix)
                finally:
                    await cleaner.close()
    js_publish_rate, js_deliver_rate = await jetstream(args.nats, args.messages)
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "backend": args.backend,
        "messages": args.messages,
        "bus_publish_per_s": round(bus_publish_rate),
        "bus_deliver_per_s": round(bus_deliver_rate),
        "jetstream_publish_per_s": round(js_publish_rate),
        "jetstream_deliver_per_s": round(js_deliver_rate),
        "publish_ratio": round(bus_publish_rate / js_publish_rate, 2),
        "deliver_ratio": round(bus_deliver_rate / js_deliver_rate, 2),
        "p50_ms_at_1k": round(statistics.median(latencies), 2),
        "p99_ms_at_1k": round(quantiles[98], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--nats", default=os.environ.get("RPCMESH_TEST_NATS", "nats://127.0.0.1:4222"))
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--backend", choices=("sqlite", "nats"), default="sqlite")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--serve-bus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.serve_bus)
        return
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
