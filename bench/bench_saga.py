"""Benchmark: 3-step sagas vs the same three calls made directly; EventStore batched appends.

Run: ``.venv/bin/python bench/bench_saga.py [--sagas 2000] [--latency-samples 200]``

In one run, on this machine, against `rpcmesh up` (SQLite, WAL, synchronous=FULL)
in its own process and three participant processes (``tests/integration/saga/participant.py``,
each call made idempotent by ``rpcmesh.saga.idempotent``, which also fsyncs):

1. Direct p50: the three ``Do`` calls made one after another by this client
   (same metadata as the coordinator sends), one sequence at a time.
2. Saga p50: ``StartSaga`` of a 3-step saga over the same calls, measured until
   the client sees it COMPLETED, one saga at a time. ``StartSaga`` with ``wait``
   answers once the saga has ended (``GetSaga`` with ``wait``, the same long
   poll, follows if the wait ran out first).
3. Saga throughput: ``--sagas`` sagas started by 64 concurrent clients, each
   waiting the same way until it sees its saga COMPLETED.
4. EventStore: 16 concurrent writers append batches of 100 events (100 bytes)
   over gRPC; events/s until every append is acknowledged.

Prints one JSON line with ``sagas_per_s``, ``p50_ratio`` (saga / direct),
``append_events_per_s`` and the underlying latencies, plus ``cpu_ms_per_saga``: the
CPU time (user + system, all threads, from ``/proc/<pid>/stat``) each process used
during the throughput phase, divided by the sagas completed in it. The machine's
cores are shared by every process, so these say where throughput goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
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

from tests.support.processes import ManagedProcess, python_env, start_control_plane  # noqa: E402

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


async def direct_p50(addresses: list[str], samples: int) -> float:
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    calls = [
        c.unary_unary("/test.v1.Ledger/Do", request_serializer=_identity, response_deserializer=_identity)
        for c in channels
    ]
    body = wrappers_pb2.StringValue(value="order").SerializeToString()
    latencies = []
    for index in range(samples + 20):
        saga_id = uuid.uuid4().hex
        began = time.perf_counter()
        for step, call in enumerate(calls):
            metadata = (
                ("x-saga-id", saga_id),
                ("x-saga-step", f"step-{step}"),
                ("x-idempotency-key", f"{saga_id}/step-{step}/execute"),
            )
            await call(body, metadata=metadata, timeout=10)
        if index >= 20:  # warm-up excluded
            latencies.append(time.perf_counter() - began)
    for channel in channels:
        await channel.close()
    return statistics.median(latencies)


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


async def saga_p50(stub: saga_pb2_grpc.SagaCoordinatorStub, samples: int) -> float:
    body = wrappers_pb2.StringValue(value="order").SerializeToString()
    latencies = []
    for index in range(samples + 20):
        began = time.perf_counter()
        await run_saga(stub, body)
        if index >= 20:
            latencies.append(time.perf_counter() - began)
    return statistics.median(latencies)


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


async def append_rate(address: str, total_events: int, writers: int = 16, batch: int = 100) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = eventstore_pb2_grpc.EventStoreStub(channel)
        data = b"x" * 100
        batches = iter(range(total_events // batch))

        async def writer(index: int) -> None:
            for number in batches:
                events = [eventstore_pb2.EventData(event_type="BenchEvent", data=data) for _ in range(batch)]
                await stub.AppendToStream(
                    eventstore_pb2.AppendToStreamRequest(
                        stream=f"bench-{index}",
                        expected_state=eventstore_pb2.EXPECTED_STATE_ANY,
                        events=events,
                    ),
                    timeout=30,
                )
                del number

        began = time.perf_counter()
        await asyncio.gather(*(writer(i) for i in range(writers)))
        return (total_events // batch) * batch / (time.perf_counter() - began)


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
    parser.add_argument(
        "--throughput-only", action="store_true", help="skip the latency and append phases (profiling)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plane, address = start_control_plane(Path(tmp) / "data")
        participants = []
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
                        str(Path(tmp) / f"{service}.db"),
                    ],
                    env=python_env(),
                )
                participants.append(proc)
                proc.wait_for_line("registered")
            addresses = await wait_resolvable(address)
            async with grpc.aio.insecure_channel(address) as channel:
                stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
                await stub.RegisterDefinition(pb.RegisterDefinitionRequest(definition=definition()))
                direct = saga = float("nan")
                if not args.throughput_only:
                    direct = await direct_p50(addresses, args.latency_samples)
                    saga = await saga_p50(stub, args.latency_samples)
                pids = {"bench_client": os.getpid(), "control_plane": plane.pid}
                pids.update({service: proc.pid for service, proc in zip(SERVICES, participants, strict=True)})
                cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                sagas_per_s = await saga_throughput(stub, args.sagas)
                cpu_ms_per_saga = {
                    name: round((cpu_seconds(pid) - cpu_before[name]) * 1000 / args.sagas, 2)
                    for name, pid in pids.items()
                }
            events_per_s = float("nan")
            if not args.throughput_only:
                events_per_s = await append_rate(address, args.append_events)
        finally:
            for proc in participants:
                proc.kill()
            plane.kill()
    figures = {
        "sagas_per_s": round(sagas_per_s, 1),
        "saga_p50_ms": round(saga * 1000, 2),
        "direct_p50_ms": round(direct * 1000, 2),
        "p50_ratio": round(saga / direct, 2),
        "append_events_per_s": None if events_per_s != events_per_s else round(events_per_s),
        "cpu_ms_per_saga": cpu_ms_per_saga,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
