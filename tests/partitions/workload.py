r"""The partition tests' client workload: every operation recorded in a history, then a final read phase.

Run inside the bed's client namespace (or anywhere, against any ``rpcmesh up`` nodes)::

    python -m tests.partitions.workload --nodes 10.77.0.31:7000,10.77.0.32:7000 --out DIR \\
        --duration 60 --seed 7 [--kinds registry,watch,eventstore,bus,saga]

It writes ``DIR/workload.jsonl`` (see :mod:`tests.partitions.history`) while it runs, then stops on
SIGTERM or after ``--duration`` seconds and runs the final read phase, which expects the network to be
healed by then (it retries each read across the nodes for ``--final-timeout`` seconds): the Registry's
live leases renewed once more and the instances listed, every stream of the run and ``$all`` read
back, the consumer group drained and the topic read, every saga's final state. That goes to
``DIR/final.json``; :func:`tests.partitions.checks.check_all` checks both.

Clients spread over the nodes and move to the next node after an ambiguous failure, so while one
node is cut off the others carry the load. Streams (Registry watches, Bus subscriptions) are probed
with a cheap unary call every second and reopened elsewhere when the probe fails twice: a partition
does not end a TCP connection, it only silences it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from rpcmesh.v1 import eventstore_pb2, eventstore_pb2_grpc, registry_pb2, registry_pb2_grpc

from tests.partitions.history import OK, UNKNOWN, HistoryWriter, classify
from tests.partitions.workload_base import CALL_TIMEOUT, Context, Cursor, duration, guarded, record_call

__all__ = ["KINDS", "main", "run_workload"]

KINDS = ("registry", "watch", "eventstore", "bus", "saga")


# Registry: registrations renewed through any node ----------------------------------------------


@dataclass
class Lease:
    """One registration this workload holds."""

    instance_id: str
    lease_id: str
    token: str
    last_ok: bool = True


async def registrant(ctx: Context, index: int, leases: dict[str, Lease], lease_ttl: float = 5.0) -> None:
    """Register an instance and renew it every 0.5 s through whichever node answers.

    A renewal answered NOT_FOUND (the lease expired) leads to a fresh registration under a new
    instance id; an ambiguous failure moves to the next node. About every 20 s the instance
    deregisters and registers anew, so watchers see changes all along.
    """
    proc = f"reg-{index}"
    cursor = Cursor(ctx.nodes, index)
    generation = 0
    lease: Lease | None = None
    while not ctx.stop.is_set():
        stub = registry_pb2_grpc.RegistryStub(ctx.channel(cursor.node))
        if lease is None:
            generation += 1
            instance_id = f"{ctx.run}-{proc}-{generation}"
            request = registry_pb2.RegisterRequest(
                instance=registry_pb2.Instance(
                    service="pt-reg", instance_id=instance_id, address=f"{ctx.listen_host}:{9000 + index}"
                ),
                ttl=duration(lease_ttl),
            )
            op, response = await record_call(
                ctx,
                proc,
                "register",
                cursor.node,
                lambda s=stub, r=request: s.Register(r, timeout=CALL_TIMEOUT),  # type: ignore[misc]
                {"instance_id": instance_id, "ttl": lease_ttl},
                lambda r: {"lease_id": r.lease_id, "revision": r.revision},
            )
            if response is not None:
                lease = Lease(instance_id, response.lease_id, response.lease_token)
                leases[proc] = lease
            else:
                cursor.rotate()
                await ctx.sleep(0.2)
            continue
        if ctx.rng.random() < 1 / 40:
            deregister = registry_pb2.DeregisterRequest(
                service="pt-reg", instance_id=lease.instance_id, lease_token=lease.token
            )
            op, _ = await record_call(
                ctx,
                proc,
                "deregister",
                cursor.node,
                lambda s=stub, r=deregister: s.Deregister(r, timeout=CALL_TIMEOUT),  # type: ignore[misc]
                {"lease_id": lease.lease_id, "instance_id": lease.instance_id},
                lambda r: {"revision": r.revision},
            )
            leases.pop(proc, None)  # deregistered, or left to expire
            lease = None
            continue
        heartbeat = registry_pb2.HeartbeatRequest(lease_id=lease.lease_id, lease_token=lease.token)
        op, _ = await record_call(
            ctx,
            proc,
            "renew",
            cursor.node,
            lambda s=stub, r=heartbeat: s.Heartbeat(r, timeout=CALL_TIMEOUT),  # type: ignore[misc]
            {"lease_id": lease.lease_id, "instance_id": lease.instance_id, "ttl": lease_ttl},
            lambda _r: {},
        )
        lease.last_ok = op.ok
        if op.code == "NOT_FOUND":
            leases.pop(proc, None)
            lease = None
        elif not op.ok:
            cursor.rotate()
        await ctx.sleep(0.5 if op.ok else 0.1)


async def watcher(ctx: Context, index: int) -> None:
    """Watch every service, recording each batch; resume after the last revision seen, elsewhere."""
    proc = f"watch-{index}"
    cursor = Cursor(ctx.nodes, index + 1)
    last = 0
    while not ctx.stop.is_set():
        node = cursor.node
        channel = ctx.private_channel(node)
        ctx.history.record(proc, "watch_open", time.monotonic(), args={"after_revision": last}, node=node)

        async def consume(channel: grpc.aio.Channel = channel, node: str = node) -> None:
            nonlocal last
            stub = registry_pb2_grpc.RegistryStub(channel)
            async for response in stub.Watch(registry_pb2.WatchRequest(after_revision=last)):
                events = [
                    [
                        e.revision,
                        registry_pb2.WatchEventType.Name(e.type).removeprefix("WATCH_EVENT_TYPE_"),
                        e.instance.service,
                        e.instance.instance_id,
                        e.instance.lease_id,
                        e.reason,
                    ]
                    for e in response.events
                ]
                ctx.history.record(
                    proc,
                    "watch_batch",
                    time.monotonic(),
                    result={"snapshot": response.snapshot, "revision": response.revision, "events": events},
                    node=node,
                )
                last = max(last, response.revision)

        error = await guarded(ctx, node, consume())
        await channel.close()
        if error is None:
            return
        if error.startswith("OUT_OF_RANGE"):
            ctx.history.record(
                proc, "watch_out_of_range", time.monotonic(), outcome="fail", error=error, node=node
            )
            last = 0
        else:
            ctx.history.record(proc, "watch_error", time.monotonic(), outcome=UNKNOWN, error=error, node=node)
            cursor.rotate()
        await ctx.sleep(0.2)


# EventStore: appends with an expected revision, a $all reader ----------------------------------


def stream_names(ctx: Context, count: int = 4) -> list[str]:
    """The run's streams."""
    return [f"pt-{ctx.run}-s{k}" for k in range(count)]


async def _current_revision(ctx: Context, node: str, stream: str) -> int | None:
    stub = eventstore_pb2_grpc.EventStoreStub(ctx.channel(node))
    request = eventstore_pb2.ReadStreamRequest(
        stream=stream, from_revision=-1, direction=eventstore_pb2.READ_DIRECTION_BACKWARDS, page_size=1
    )
    try:
        response = await stub.ReadStream(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError:
        return None
    return int(response.current_revision)


async def appender(ctx: Context, index: int, streams: list[str]) -> None:
    """Append one event at a time to a random stream with the revision it believes current.

    A wrong expected revision (FAILED_PRECONDITION) re-reads the stream; an ambiguous failure retries
    the same event (same id, same expected revision: the store answers a retry with the original
    revision) up to three times on the next nodes.
    """
    proc = f"es-{index}"
    cursor = Cursor(ctx.nodes, index)
    known: dict[str, int | None] = dict.fromkeys(streams)
    sequence = 0
    while not ctx.stop.is_set():
        stream = ctx.rng.choice(streams)
        if known[stream] is None:
            known[stream] = await _current_revision(ctx, cursor.node, stream)
            if known[stream] is None:
                cursor.rotate()
                await ctx.sleep(0.2)
                continue
        sequence += 1
        event_id = f"{proc}-{sequence}"
        expected = known[stream]
        assert expected is not None
        for attempt in range(4):
            request = eventstore_pb2.AppendToStreamRequest(
                stream=stream,
                events=[eventstore_pb2.EventData(event_id=event_id, event_type="pt", data=b"x")],
            )
            if expected < 0:
                request.expected_state = eventstore_pb2.EXPECTED_STATE_NO_STREAM
            else:
                request.expected_revision = expected
            stub = eventstore_pb2_grpc.EventStoreStub(ctx.channel(cursor.node))
            op, response = await record_call(
                ctx,
                proc,
                "append",
                cursor.node,
                lambda s=stub, r=request: s.AppendToStream(r, timeout=CALL_TIMEOUT),  # type: ignore[misc]
                {"stream": stream, "event_id": event_id, "expected_revision": expected, "attempt": attempt},
                lambda r: {"revision": r.current_revision, "position": r.position, "appended": r.appended},
            )
            if response is not None:
                known[stream] = int(response.current_revision)
                break
            if op.outcome != UNKNOWN:
                known[stream] = None
                break
            cursor.rotate()
            if not await ctx.sleep(0.1) and attempt >= 1:
                break
        else:
            known[stream] = None
        await ctx.sleep(0.1)


async def head_position(ctx: Context) -> int:
    """The newest $all position now (retrying across nodes)."""
    cursor = Cursor(ctx.nodes, 0)
    while True:
        stub = eventstore_pb2_grpc.EventStoreStub(ctx.channel(cursor.node))
        try:
            response = await stub.ReadAll(eventstore_pb2.ReadAllRequest(page_size=1), timeout=CALL_TIMEOUT)
            return int(response.last_position)
        except grpc.RpcError:
            cursor.rotate()
            await asyncio.sleep(0.2)


async def all_reader(ctx: Context, index: int, start: int) -> None:
    """Poll ``$all`` from ``start`` + 1, recording every page read (positions, stream, event id)."""
    proc = f"all-{index}"
    cursor = Cursor(ctx.nodes, index + 2)
    last = start
    while not ctx.stop.is_set():
        stub = eventstore_pb2_grpc.EventStoreStub(ctx.channel(cursor.node))
        request = eventstore_pb2.ReadAllRequest(from_position=last + 1, page_size=500)
        _op, response = await record_call(
            ctx,
            proc,
            "read_all",
            cursor.node,
            lambda s=stub, r=request: s.ReadAll(r, timeout=CALL_TIMEOUT),  # type: ignore[misc]
            {"from_position": last + 1},
            lambda r: {"events": [[e.position, e.stream, e.event_id, e.stream_revision] for e in r.events]},
        )
        if response is None:
            cursor.rotate()
        elif response.events:
            last = max(last, max(e.position for e in response.events))
            continue
        await ctx.sleep(0.2)


async def read_stream(ctx: Context, stream: str) -> list[list[Any]]:
    """Every event of ``stream`` as ``[revision, event_id, position]`` (retrying across nodes)."""
    cursor = Cursor(ctx.nodes, 0)
    events: list[list[Any]] = []
    token = ""
    failures = 0
    while True:
        stub = eventstore_pb2_grpc.EventStoreStub(ctx.channel(cursor.node))
        request = eventstore_pb2.ReadStreamRequest(
            stream=stream, from_revision=0, direction=eventstore_pb2.READ_DIRECTION_FORWARDS, page_size=1000
        )
        if token:
            request.page_token = token
        try:
            response = await stub.ReadStream(request, timeout=CALL_TIMEOUT * 2)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return events
            failures += 1
            if failures > 30:
                raise
            cursor.rotate()
            await asyncio.sleep(0.5)
            continue
        events += [[e.stream_revision, e.event_id, e.position] for e in response.events]
        token = response.next_page_token
        if not token:
            return events


async def read_all(ctx: Context, start: int) -> list[list[Any]]:
    """Every ``$all`` event after ``start`` as ``[position, stream, event_id, revision]``."""
    cursor = Cursor(ctx.nodes, 0)
    events: list[list[Any]] = []
    last = start
    failures = 0
    while True:
        stub = eventstore_pb2_grpc.EventStoreStub(ctx.channel(cursor.node))
        try:
            response = await stub.ReadAll(
                eventstore_pb2.ReadAllRequest(from_position=last + 1, page_size=1000),
                timeout=CALL_TIMEOUT * 2,
            )
        except grpc.RpcError:
            failures += 1
            if failures > 30:
                raise
            cursor.rotate()
            await asyncio.sleep(0.5)
            continue
        if not response.events:
            return events
        events += [[e.position, e.stream, e.event_id, e.stream_revision] for e in response.events]
        last = events[-1][0]


async def final_registry(ctx: Context, leases: dict[str, Lease]) -> dict[str, Any]:
    """Renew each live lease once more, then list the instances (waiting for slow views)."""
    live = []
    for lease in leases.values():
        renewed = False
        for attempt in range(3 * len(ctx.nodes)):
            node = ctx.nodes[attempt % len(ctx.nodes)]
            stub = registry_pb2_grpc.RegistryStub(ctx.channel(node))
            heartbeat = registry_pb2.HeartbeatRequest(lease_id=lease.lease_id, lease_token=lease.token)
            op, _ = await record_call(
                ctx,
                "final",
                "renew",
                node,
                lambda s=stub, r=heartbeat: s.Heartbeat(r, timeout=CALL_TIMEOUT),  # type: ignore[misc]
                {"lease_id": lease.lease_id, "instance_id": lease.instance_id, "ttl": 5.0},
                lambda _r: {},
            )
            if op.outcome != UNKNOWN:
                renewed = op.ok
                break
            await asyncio.sleep(0.3)
        live.append({"instance_id": lease.instance_id, "lease_id": lease.lease_id, "renewed": renewed})
    wanted = {entry["instance_id"] for entry in live if entry["renewed"]}
    listed: set[str] = set()
    for attempt in range(10):
        node = ctx.nodes[attempt % len(ctx.nodes)]
        stub = registry_pb2_grpc.RegistryStub(ctx.channel(node))
        try:
            response = await stub.Resolve(
                registry_pb2.ResolveRequest(service="pt-reg", include_unhealthy=True), timeout=CALL_TIMEOUT
            )
        except grpc.RpcError:
            await asyncio.sleep(0.3)
            continue
        listed = {instance.instance_id for instance in response.instances}
        if wanted <= listed:
            break
        await asyncio.sleep(0.3)
    return {"live": live, "instances": sorted(listed)}


# The run ----------------------------------------------------------------------------------------


def local_address(node: str) -> str:
    """The local address this machine uses to reach ``node`` (what its participants advertise)."""
    host, _, port = node.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, int(port)))
        return str(probe.getsockname()[0])


async def run_workload(
    nodes: list[str],
    out: Path,
    duration: float,
    seed: int,
    kinds: tuple[str, ...] = KINDS,
    final_timeout: float = 90.0,
) -> dict[str, Any]:
    """Run the workload for ``duration`` seconds (or until SIGTERM), then the final read phase."""
    from tests.partitions import workload_bus

    rng = random.Random(seed)
    # Not from the seed: a replayed seed must not find the streams and topic of an earlier run.
    run = f"{seed:x}{secrets.token_hex(3)}"
    history = HistoryWriter(out / "workload.jsonl")
    ctx = Context(nodes=nodes, history=history, run=run, rng=rng, listen_host=local_address(nodes[0]))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, ctx.stop.set)
    history.record("workload", "start", time.monotonic(), args={"nodes": nodes, "seed": seed, "kinds": kinds})
    leases: dict[str, Lease] = {}
    streams = stream_names(ctx)
    start_position = await head_position(ctx) if "eventstore" in kinds else 0
    extras = await workload_bus.start(ctx, kinds)
    tasks: list[asyncio.Task[None]] = []
    if "registry" in kinds:
        tasks += [asyncio.create_task(registrant(ctx, i, leases)) for i in range(3)]
    if "watch" in kinds:
        tasks += [asyncio.create_task(watcher(ctx, i)) for i in range(2)]
    if "eventstore" in kinds:
        tasks += [asyncio.create_task(appender(ctx, i, streams)) for i in range(3)]
        tasks.append(asyncio.create_task(all_reader(ctx, 0, start_position)))
    tasks += workload_bus.tasks(ctx, extras)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ctx.stop.wait(), duration)
    ctx.stop.set()
    history.record("workload", "stop", time.monotonic())
    results = await asyncio.gather(*tasks, return_exceptions=True)
    problems = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    final: dict[str, Any] = {"run": run, "seed": seed, "nodes": nodes, "problems": problems, "seconds": {}}
    started = time.monotonic()
    try:
        if "registry" in kinds:
            final["registry"] = await final_registry(ctx, leases)
            final["seconds"]["registry"] = round(time.monotonic() - started, 3)
        if "eventstore" in kinds:
            final["eventstore"] = {
                "streams": {stream: await read_stream(ctx, stream) for stream in streams},
                "all": await read_all(ctx, start_position),
            }
            final["seconds"]["eventstore"] = round(time.monotonic() - started, 3)
        final.update(await workload_bus.final(ctx, extras, within=final_timeout))
        final["seconds"]["bus and sagas"] = round(time.monotonic() - started, 3)
    except Exception as exc:  # recorded as a problem (a violation) rather than losing final.json
        problems.append(f"final read failed: {classify(exc)[1]}")
    finally:
        await workload_bus.close(extras)
        history.record("workload", "final", time.monotonic(), outcome=OK if not problems else UNKNOWN)
        (out / "final.json").write_text(json.dumps(final, separators=(",", ":")), encoding="utf-8")
        history.close()
        await ctx.close()
    return final


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m tests.partitions.workload``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", required=True, help="control-plane addresses host:port, comma-separated")
    parser.add_argument("--out", required=True, type=Path, help="folder for workload.jsonl and final.json")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds to run (SIGTERM stops sooner)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--final-timeout",
        type=float,
        default=90.0,
        help="seconds the final phase waits for the group and sagas",
    )
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
    args = parser.parse_args(argv)
    kinds = tuple(kind for kind in args.kinds.split(",") if kind)
    args.out.mkdir(parents=True, exist_ok=True)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"--kinds: unknown {sorted(unknown)}")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    nodes = [node for node in args.nodes.split(",") if node]
    final = asyncio.run(run_workload(nodes, args.out, args.duration, args.seed, kinds, args.final_timeout))
    print(f"workload done: {args.out} ({len(final.get('problems', []))} problems)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
