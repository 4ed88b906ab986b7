"""Benchmark: the rpcmesh EventStore vs the ``eventsourcing`` library's recorders, SQLite and PostgreSQL.

Run: ``.venv/bin/python bench/bench_eventstore.py [--store both|sqlite|postgresql] [--rounds 5]``
(needs ``pip install 'eventsourcing[postgres]'``; PostgreSQL at RPCMESH_TEST_PG* as for the tests).

Systems, all measured from this process:

- ``rpcmesh_sqlite``: one ``rpcmesh up`` process (SQLite, WAL, synchronous=FULL), over gRPC.
- ``rpcmesh_postgresql``: two ``rpcmesh up --store`` processes on one fresh database; writer
  ``w`` talks to node ``w % 2`` (appends from both nodes land in one ``$all``).
- ``eventsourcing_sqlite``: ``SQLiteApplicationRecorder`` on a file (WAL; Python's sqlite3
  default synchronous=FULL, checked and reported), 16 threads in this process.
- ``eventsourcing_postgresql``: ``PostgresApplicationRecorder`` (psycopg 3 pool of 16) on its
  own fresh database of the same server, 16 threads in this process.

Durability is the same on both sides: every acknowledged append is fsynced (SQLite
synchronous=FULL; PostgreSQL fsync=on, synchronous_commit=on, reported from the server).
Both keep a gap-free global order (``$all`` / notification ids) and check versions per
stream (rpcmesh: exact expected revision; eventsourcing: the unique (id, version) key).

Workloads, per system and round: (1) single-event appends with optimistic concurrency,
16 concurrent writers, each on its own stream at its exact expected revision; (2) 100-event
batches, same writers; (3) reading one 500-event stream, 16 concurrent readers; (4) reading
all in order from the start, 1000 per page, up to ``--read-all`` events.

The machine is shared and loaded: one warm-up round (not counted), then ``--rounds`` rounds
in which every system runs every workload, workload by workload, the order of the systems
rotating from round to round (single appends in ``--slices`` short turns per round), so all
see the same load. Figures are medians over rounds; ratios are medians of the
per-round ratios. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rpcmesh.v1 import eventstore_pb2 as pb  # noqa: E402
from rpcmesh.v1 import eventstore_pb2_grpc  # noqa: E402

from tests.support import backends  # noqa: E402
from tests.support.processes import ManagedProcess, start_control_plane  # noqa: E402

WRITERS = 16
READ_STREAM_EVENTS = 500
DATA = b"x" * 100
WORKLOADS = ("single", "batch", "read_stream", "read_all")


class System(Protocol):
    name: str

    async def single(self, tag: str, per_writer: int) -> float:
        """Single-event appends/s."""
        ...

    async def batch(self, tag: str, per_writer: int, size: int) -> float:
        """Events/s appended in batches of ``size``."""
        ...

    async def read_stream(self, reads: int) -> float:
        """Events/s read from the 500-event stream."""
        ...

    async def read_all(self, limit: int) -> float:
        """Events/s read in global order."""
        ...


async def _timed(work: Callable[[int], Awaitable[None]], workers: int) -> float:
    began = time.perf_counter()
    await asyncio.gather(*(work(w) for w in range(workers)))
    return time.perf_counter() - began


class RpcmeshSystem:
    """rpcmesh EventStore over gRPC, one or more nodes."""

    def __init__(self, name: str, addresses: Sequence[str]) -> None:
        self.name = name
        self.channels = [grpc.aio.insecure_channel(a) for a in addresses]
        self.stubs = [eventstore_pb2_grpc.EventStoreStub(c) for c in self.channels]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def _append(self, w: int, stream: str, revision: int, events: list[pb.EventData]) -> int:
        request = pb.AppendToStreamRequest(stream=stream, events=events)
        if revision < 0:
            request.expected_state = pb.EXPECTED_STATE_NO_STREAM
        else:
            request.expected_revision = revision
        response = await self.stubs[w % len(self.stubs)].AppendToStream(request, timeout=60)
        return int(response.current_revision)

    async def single(self, tag: str, per_writer: int) -> float:
        async def writer(w: int) -> None:
            revision = -1
            for _ in range(per_writer):
                revision = await self._append(
                    w, f"{tag}-s{w}", revision, [pb.EventData(event_type="E", data=DATA)]
                )

        return WRITERS * per_writer / await _timed(writer, WRITERS)

    async def batch(self, tag: str, per_writer: int, size: int) -> float:
        async def writer(w: int) -> None:
            revision = -1
            for _ in range(per_writer):
                events = [pb.EventData(event_type="E", data=DATA) for _ in range(size)]
                revision = await self._append(w, f"{tag}-b{w}", revision, events)

        return WRITERS * per_writer * size / await _timed(writer, WRITERS)

    async def setup_read_stream(self) -> None:
        events = [pb.EventData(event_type="E", data=DATA) for _ in range(READ_STREAM_EVENTS)]
        await self._append(0, "read-me", -1, events)

    async def read_stream(self, reads: int) -> float:
        async def reader(w: int) -> None:
            stub = self.stubs[w % len(self.stubs)]
            for _ in range(reads):
                response = await stub.ReadStream(pb.ReadStreamRequest(stream="read-me", page_size=1000))
                assert len(response.events) == READ_STREAM_EVENTS

        return WRITERS * reads * READ_STREAM_EVENTS / await _timed(reader, WRITERS)

    async def read_all(self, limit: int) -> float:
        began, count, token = time.perf_counter(), 0, ""
        while count < limit:
            page = await self.stubs[0].ReadAll(pb.ReadAllRequest(page_size=1000, page_token=token))
            count += len(page.events)
            token = page.next_page_token
            if not token:
                break
        return count / (time.perf_counter() - began)


class EventsourcingSystem:
    """An eventsourcing ApplicationRecorder driven by 16 threads of this process."""

    def __init__(self, name: str, recorder: Any) -> None:
        from eventsourcing.persistence import StoredEvent

        self.name = name
        self.recorder = recorder
        self.stored_event = StoredEvent
        self.pool = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix=name)

    async def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.recorder.datastore.close()

    async def _run(self, fn: Callable[[int], None]) -> float:
        loop = asyncio.get_running_loop()

        async def work(w: int) -> None:
            await loop.run_in_executor(self.pool, fn, w)

        return await _timed(work, WRITERS)

    def _events(self, stream: str, first_version: int, count: int) -> list[Any]:
        originator = uuid.uuid5(uuid.NAMESPACE_URL, stream)
        return [
            self.stored_event(originator_id=originator, originator_version=v, topic="bench:E", state=DATA)
            for v in range(first_version, first_version + count)
        ]

    async def single(self, tag: str, per_writer: int) -> float:
        def writer(w: int) -> None:
            for version in range(per_writer):
                self.recorder.insert_events(self._events(f"{tag}-s{w}", version, 1))

        return WRITERS * per_writer / await self._run(writer)

    async def batch(self, tag: str, per_writer: int, size: int) -> float:
        def writer(w: int) -> None:
            for number in range(per_writer):
                self.recorder.insert_events(self._events(f"{tag}-b{w}", number * size, size))

        return WRITERS * per_writer * size / await self._run(writer)

    async def setup_read_stream(self) -> None:
        self.recorder.insert_events(self._events("read-me", 0, READ_STREAM_EVENTS))

    async def read_stream(self, reads: int) -> float:
        originator = uuid.uuid5(uuid.NAMESPACE_URL, "read-me")

        def reader(w: int) -> None:
            for _ in range(reads):
                assert len(self.recorder.select_events(originator)) == READ_STREAM_EVENTS

        return WRITERS * reads * READ_STREAM_EVENTS / await self._run(reader)

    async def read_all(self, limit: int) -> float:
        def run() -> int:
            count, start = 0, 1
            while count < limit:
                page = self.recorder.select_notifications(start, 1000)
                if not page:
                    break
                count += len(page)
                start = page[-1].id + 1
            return count

        began = time.perf_counter()
        count = await asyncio.get_running_loop().run_in_executor(self.pool, run)
        return count / (time.perf_counter() - began)


def eventsourcing_sqlite(path: Path) -> EventsourcingSystem:
    from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

    datastore = SQLiteDatastore(str(path), pool_size=WRITERS, max_overflow=0, pool_timeout=60)
    recorder = SQLiteApplicationRecorder(datastore, events_table_name="stored_events")
    recorder.create_table()
    return EventsourcingSystem("eventsourcing_sqlite", recorder)


def eventsourcing_postgres(url: str) -> EventsourcingSystem:
    from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

    dbname = url.rsplit("/", 1)[1]
    datastore = PostgresDatastore(
        dbname,
        backends.POSTGRES_HOST,
        backends.POSTGRES_PORT,
        backends.POSTGRES_USER,
        "",
        pool_size=WRITERS,
        max_overflow=0,
    )
    recorder = PostgresApplicationRecorder(datastore, events_table_name="stored_events")
    recorder.create_table()
    return EventsourcingSystem("eventsourcing_postgresql", recorder)


def server_durability(url: str) -> dict[str, str]:
    import psycopg

    with psycopg.connect(url) as conn:
        return {
            name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in ("fsync", "synchronous_commit")
        }


async def run(args: argparse.Namespace, systems: list[Any]) -> dict[str, Any]:
    for system in systems:
        await system.setup_read_stream()
    figures: dict[str, dict[str, list[float]]] = {s.name: {w: [] for w in WORKLOADS} for s in systems}
    for round_number in range(args.rounds + 1):  # round 0 warms up
        order = systems[round_number % len(systems) :] + systems[: round_number % len(systems)]
        rates: dict[str, dict[str, float]] = {system.name: {} for system in systems}
        # Single appends: short slices, the systems taking turns, so load bursts hit all alike.
        spent = dict.fromkeys(rates, 0.0)
        per_slice = max(1, args.singles // args.slices)
        for number in range(args.slices):
            for system in order:
                rate = await system.single(f"r{round_number}x{number}", per_slice)
                spent[system.name] += WRITERS * per_slice / rate
        for name in rates:
            rates[name]["single"] = WRITERS * per_slice * args.slices / spent[name]
        for system in order:
            rates[system.name]["batch"] = await system.batch(f"r{round_number}", args.batches, 100)
        for system in order:
            rates[system.name]["read_stream"] = await system.read_stream(args.reads)
        for system in order:
            rates[system.name]["read_all"] = await system.read_all(args.read_all)
        for name, by_workload in rates.items():
            if round_number:
                for workload, rate in by_workload.items():
                    figures[name][workload].append(rate)
            print(
                f"round {round_number} {name}: "
                + ", ".join(f"{k} {v:,.0f}/s" for k, v in by_workload.items()),
                file=sys.stderr,
            )
    result: dict[str, Any] = {}
    for name, by_workload in figures.items():
        for workload, rates in by_workload.items():
            unit = "appends_per_s" if workload == "single" else "events_per_s"
            result[f"{name}_{workload}_{unit}"] = round(statistics.median(rates))

    def ratio(a: str, b: str, workload: str) -> float | None:
        if a not in figures or b not in figures:
            return None
        pairs = zip(figures[a][workload], figures[b][workload], strict=True)
        return round(statistics.median(x / y for x, y in pairs), 2)

    for workload in WORKLOADS:
        for key, a, b in (
            ("postgresql_vs_sqlite", "rpcmesh_postgresql", "rpcmesh_sqlite"),
            ("postgresql_vs_eventsourcing", "rpcmesh_postgresql", "eventsourcing_postgresql"),
            ("sqlite_vs_eventsourcing", "rpcmesh_sqlite", "eventsourcing_sqlite"),
        ):
            value = ratio(a, b, workload)
            if value is not None:
                result[f"{key}_{workload}_ratio"] = value
    return result


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", choices=("both", "sqlite", "postgresql"), default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--singles", type=int, default=60, help="single-event appends per writer per round")
    parser.add_argument("--slices", type=int, default=5, help="turns the single appends of a round take")
    parser.add_argument("--batches", type=int, default=3, help="100-event batches per writer per round")
    parser.add_argument("--reads", type=int, default=10, help="reads of the 500-event stream per reader")
    parser.add_argument("--read-all", type=int, default=20_000, help="events read in order per round")
    args = parser.parse_args()
    processes: list[ManagedProcess] = []
    systems: list[Any] = []
    extra: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        backends.fresh_postgres_database() as rpcmesh_url,
        backends.fresh_postgres_database() as es_url,
    ):
        try:
            if args.store in ("both", "sqlite"):
                proc, address = start_control_plane(Path(tmp) / "sqlite")
                processes.append(proc)
                systems.append(RpcmeshSystem("rpcmesh_sqlite", [address]))
                systems.append(eventsourcing_sqlite(Path(tmp) / "eventsourcing.db"))
                conn = sqlite3.connect(Path(tmp) / "probe.db")
                extra["eventsourcing_sqlite_synchronous"] = conn.execute("PRAGMA synchronous").fetchone()[0]
                conn.close()
            if args.store in ("both", "postgresql"):
                addresses = []
                for node in range(2):
                    proc, address = start_control_plane(Path(tmp) / f"pg{node}", "--store", rpcmesh_url)
                    processes.append(proc)
                    addresses.append(address)
                systems.append(RpcmeshSystem("rpcmesh_postgresql", addresses))
                systems.append(eventsourcing_postgres(es_url))
                extra["postgresql"] = server_durability(es_url)
            figures = await run(args, systems)
        finally:
            for system in systems:
                await system.close()
            for proc in processes:
                proc.kill()
    figures.update(extra)
    figures.update(rounds=args.rounds, writers=WRITERS, singles_per_writer=args.singles, cpus=os.cpu_count())
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
