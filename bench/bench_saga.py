"""Benchmark: 3-step sagas vs the same three calls made directly; EventStore batched appends.

Run: ``.venv/bin/python bench/bench_saga.py [--sagas 2000] [--latency-samples 200] [--store postgresql]
[--bus nats]`` (the scale-out modes put `rpcmesh up` on a fresh database of the local PostgreSQL and on the
local NATS JetStream).

In one run, on this machine, against `rpcmesh up` (SQLite, WAL, synchronous=FULL)
in its own process and three participant processes (``tests/integration/saga/participant.py``,
each call made idempotent by ``rpcmesh.saga.idempotent``, which also fsyncs):

1.+2. Paired p50: one direct sequence (the three ``Do`` calls made one after
   another by this client, same metadata as the coordinator sends), then one saga
   (``StartSaga`` of a 3-step saga over the same calls, measured until the client
   sees it COMPLETED: ``StartSaga`` with ``wait`` answers once the saga has ended,
   ``GetSaga`` with ``wait`` follows if the wait ran out first), alternately, one
   at a time; ``p50_ratio`` is the median of each pair's saga ÷ direct.
3. Saga throughput: ``--sagas`` sagas started by 64 concurrent clients, each
   waiting the same way until it sees its saga COMPLETED.
4. EventStore: 16 concurrent writers append batches of 100 events (100 bytes)
   over gRPC; events/s until every append is acknowledged
   (``append_events_per_s``); then the same with one event per append
   (``append_single_events_per_s``, for at most 10 s).

Prints one JSON line with ``sagas_per_s``, ``p50_ratio`` (saga / direct),
``append_events_per_s`` and the underlying latencies, plus ``cpu_ms_per_saga``: the
CPU time (user + system, all threads, from ``/proc/<pid>/stat``) each process used
during the throughput phase, divided by the sagas completed in it. The machine's
cores are shared by every process, so these say where throughput goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
from google.protobuf import duration_pb2, wrappers_pb2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from process_cpu import cpu_seconds  # noqa: E402
from rpcmesh.v1 import (  # noqa: E402
    eventstore_pb2,
    eventstore_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    saga_pb2_grpc,
)
from rpcmesh.v1 import saga_pb2 as pb  # noqa: E402

from tests.support.backends import postgres_admin_url  # noqa: E402
from tests.support.processes import ManagedProcess, python_env, start_control_plane  # noqa: E402


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A fresh database of the local PostgreSQL for one bench run, dropped afterwards; yields its URL.

    Never the tests' database: its own name (``<prefix>_<random>``) on the same server.
    """
    import psycopg

    admin = postgres_admin_url()
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


PARTICIPANT = ROOT / "tests" / "integration" / "saga" / "participant.py"
SERVICES = ("ledger-a", "ledger-b", "ledger-c")


def _identity(data: bytes) -> bytes:
    return data


def definition() -> pb.SagaDefinition:
    steps = [
        pb.SagaStep(
            name=f"step-{index}",
            service=service,
            method="/test.v1.Ledger/Do",
            compensation_method="/test.v1.Ledger/Undo",
            request=pb.PayloadTemplate(base_from="input"),
        )
        for index, service in enumerate(SERVICES)
    ]
    return pb.SagaDefinition(name="bench3", steps=steps)


class Direct:
    """The saga's three ``Do`` calls made one after another by this client (the coordinator's metadata)."""

    def __init__(self, addresses: list[str]) -> None:
        self.channels = [grpc.aio.insecure_channel(a) for a in addresses]
        self.calls = [
            c.unary_unary("/test.v1.Ledger/Do", request_serializer=_identity, response_deserializer=_identity)
            for c in self.channels
        ]
        self.body = wrappers_pb2.StringValue(value="order").SerializeToString()

    async def sequence(self) -> None:
        saga_id = uuid.uuid4().hex
        for step, call in enumerate(self.calls):
            metadata = (
                ("x-saga-id", saga_id),
                ("x-saga-step", f"step-{step}"),
                ("x-idempotency-key", f"{saga_id}/step-{step}/execute"),
            )
            await call(self.body, metadata=metadata, timeout=10)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def paired_p50(
    addresses: list[str], stub: saga_pb2_grpc.SagaCoordinatorStub, samples: int
) -> tuple[float, float, float]:
    """Saga and direct samples interleaved one by one; (saga p50, direct p50, median of the pairs' ratios).

    Interleaving makes every saga sample meet the same machine load as the direct
    sample next to it, so the ratio is paired rather than taken across two phases.
    """
    direct = Direct(addresses)
    body = direct.body
    sagas: list[float] = []
    directs: list[float] = []
    try:
        for index in range(samples + 20):
            began = time.perf_counter()
            await direct.sequence()
            middle = time.perf_counter()
            await run_saga(stub, body)
            ended = time.perf_counter()
            if index >= 20:  # warm-up excluded
                directs.append(middle - began)
                sagas.append(ended - middle)
    finally:
        await direct.close()
    ratios = [saga / plain for saga, plain in zip(sagas, directs, strict=True)]
    return statistics.median(sagas), statistics.median(directs), statistics.median(ratios)


_WAIT = duration_pb2.Duration(seconds=30)
_ENDED = (pb.SAGA_STATE_COMPENSATED, pb.SAGA_STATE_FAILED_COMPENSATION, pb.SAGA_STATE_ABORTED)


async def run_saga(stub: saga_pb2_grpc.SagaCoordinatorStub, body: bytes) -> None:
    """Start a saga and return once the client has seen it COMPLETED.

    StartSaga with ``wait`` answers once the saga has ended (or after the wait);
    GetSaga long polls follow while it has not.
    """
    started = await stub.StartSaga(
        pb.StartSagaRequest(definition_name="bench3", input=body, wait=_WAIT), timeout=60
    )
    saga = started.saga
    while saga.state != pb.SAGA_STATE_COMPLETED:
        if saga.state in _ENDED:
            raise RuntimeError(f"saga failed: {saga.error}")
        saga = (await stub.GetSaga(pb.GetSagaRequest(saga_id=saga.saga_id, wait=_WAIT), timeout=60)).saga


async def saga_throughput(
    stub: saga_pb2_grpc.SagaCoordinatorStub, total: int, concurrency: int = 64
) -> float:
    body = wrappers_pb2.StringValue(value="order").SerializeToString()
    remaining = iter(range(total))

    async def worker() -> None:
        for _ in remaining:
            await run_saga(stub, body)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - began)


async def append_rate(
    address: str, total_events: int, writers: int = 16, batch: int = 100, seconds: float = 30.0
) -> float:
    """Events/s of ``writers`` concurrent ``batch``-event appenders, acknowledged ones only.

    Until ``total_events`` are acknowledged or ``seconds`` have passed (appends in flight then count).
    """
    async with grpc.aio.insecure_channel(address) as channel:
        stub = eventstore_pb2_grpc.EventStoreStub(channel)
        data = b"x" * 100
        batches = iter(range(total_events // batch))
        appended = [0]
        began = time.perf_counter()

        async def writer(index: int) -> None:
            for _ in batches:
                if time.perf_counter() - began > seconds:
                    return
                events = [eventstore_pb2.EventData(event_type="BenchEvent", data=data) for _ in range(batch)]
                await stub.AppendToStream(
                    eventstore_pb2.AppendToStreamRequest(
                        stream=f"bench-{index}",
                        expected_state=eventstore_pb2.EXPECTED_STATE_ANY,
                        events=events,
                    ),
                    timeout=30,
                )
                appended[0] += batch

        await asyncio.gather(*(writer(i) for i in range(writers)))
        return appended[0] / (time.perf_counter() - began)


async def start_participants(tmp: Path, address: str) -> list[ManagedProcess]:
    """The three participant processes, registered in ``address``'s Registry."""
    participants: list[ManagedProcess] = []
    try:
        for service in SERVICES:
            proc = ManagedProcess(
                [
                    sys.executable,
                    str(PARTICIPANT),
                    "--registry",
                    address,
                    "--service",
                    service,
                    "--db",
                    str(tmp / f"{service}.db"),
                ],
                env=python_env(),
            )
            participants.append(proc)
            proc.wait_for_line("registered")
    except BaseException:
        for proc in participants:
            proc.kill()
        raise
    return participants


def plane_arguments(
    stack: contextlib.ExitStack, store: str | None, bus: str | None, prefix: str
) -> list[str]:
    """``rpcmesh up`` flags of the scale-out modes: a fresh PostgreSQL database, the local NATS."""
    extra: list[str] = []
    if store == "postgresql":
        extra += ["--store", stack.enter_context(postgres_database(prefix))]
    if bus == "nats":
        extra += ["--bus", os.environ.get("RPCMESH_TEST_NATS_URL", "nats://127.0.0.1:4222")]
    return extra


async def wait_resolvable(address: str) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        found = []
        for service in SERVICES:
            response = await stub.Resolve(registry_pb2.ResolveRequest(service=service), timeout=5)
            found.append(response.instances[0].address)
        return found


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--append-events", type=int, default=200_000)
    parser.add_argument("--single-events", type=int, default=20_000, help="events appended one per call")
    parser.add_argument("--store", choices=["postgresql"], help="rpcmesh's store (default: embedded SQLite)")
    parser.add_argument("--bus", choices=["nats"], help="rpcmesh's Bus (default: embedded SQLite)")
    parser.add_argument(
        "--throughput-only", action="store_true", help="skip the latency and append phases (profiling)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        extra = plane_arguments(stack, args.store, args.bus, "bench_saga")
        plane, address = start_control_plane(Path(tmp) / "data", *extra)
        participants: list[ManagedProcess] = []
        try:
            participants = await start_participants(Path(tmp), address)
            addresses = await wait_resolvable(address)
            async with grpc.aio.insecure_channel(address) as channel:
                stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
                await stub.RegisterDefinition(pb.RegisterDefinitionRequest(definition=definition()))
                direct = saga = ratio = float("nan")
                if not args.throughput_only:
                    saga, direct, ratio = await paired_p50(addresses, stub, args.latency_samples)
                pids = {"bench_client": os.getpid(), "control_plane": plane.pid}
                pids.update({service: proc.pid for service, proc in zip(SERVICES, participants, strict=True)})
                cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                sagas_per_s = await saga_throughput(stub, args.sagas)
                cpu_ms_per_saga = {
                    name: round((cpu_seconds(pid) - cpu_before[name]) * 1000 / args.sagas, 2)
                    for name, pid in pids.items()
                }
            events_per_s = single_per_s = float("nan")
            if not args.throughput_only:
                events_per_s = await append_rate(address, args.append_events)
                single_per_s = await append_rate(address, args.single_events, batch=1, seconds=10)
        finally:
            for proc in participants:
                proc.kill()
            plane.kill()
    figures = {
        "store": args.store or "sqlite",
        "bus": args.bus or "sqlite",
        "sagas_per_s": round(sagas_per_s, 1),
        "saga_p50_ms": round(saga * 1000, 2),
        "direct_p50_ms": round(direct * 1000, 2),
        "p50_ratio": round(ratio, 2),
        "append_events_per_s": None if events_per_s != events_per_s else round(events_per_s),
        "append_single_events_per_s": None if single_per_s != single_per_s else round(single_per_s),
        "cpu_ms_per_saga": cpu_ms_per_saga,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
