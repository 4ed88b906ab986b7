"""Sagas vs DBOS: the same 3-step workflow over the same gRPC participants, on SQLite or PostgreSQL.

In one run, the three participant processes of ``bench_saga.py`` (registered
in a real ``rpcmesh up``) serve both systems:

- rpcmesh: ``StartSaga`` of the 3-step saga ``bench3`` (SagaCoordinator in
  ``rpcmesh up``, SQLite by default, a fresh PostgreSQL database with
  ``--store postgresql``), waited for until COMPLETED, as in ``bench_saga.py``;
- DBOS (``dbos`` 3.x, in this process, as a DBOS application runs): a
  ``@DBOS.workflow`` whose three ``@DBOS.step`` s call the same ``Do`` methods
  with the same metadata, compensation written the way a DBOS user writes it
  (``try``/``except`` in the workflow calling ``Undo`` on the completed steps
  in reverse). Its system database is a SQLite file, or with ``--store
  postgresql`` a fresh database of the same local PostgreSQL server.

Rounds alternate between the two (the order flips every round); each system's
block is a warm-up, a throughput phase (``--sagas`` workflows from 64
concurrent callers, each waiting for its result), then one-at-a-time latency
samples. DBOS is launched for its own blocks only and destroyed after them, so
its executor and background threads do not share this process with rpcmesh's
client while rpcmesh is measured (a DBOS application is a process of its own).
Figures are medians over the rounds. Prints one JSON line.

    .venv/bin/python bench/bench_dbos.py [--store postgresql] [--rounds 3] [--sagas 600]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import wrappers_pb2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_saga import (  # noqa: E402
    definition,
    plane_arguments,
    postgres_database,
    run_saga,
    start_participants,
    wait_resolvable,
)
from process_cpu import cpu_seconds  # noqa: E402
from rpcmesh.v1 import saga_pb2 as pb  # noqa: E402
from rpcmesh.v1 import saga_pb2_grpc  # noqa: E402

from tests.support.processes import ManagedProcess, start_control_plane  # noqa: E402

CONCURRENCY = 64
# The participants' callables, set once the event loop runs (grpc.aio channels belong to one loop).
CALLS: list[dict[str, Any]] = []


def _identity(data: bytes) -> bytes:
    return data


def build_workflow() -> Any:
    """Register the DBOS workflow and its step (before ``DBOS.launch()``); returns the workflow."""
    from dbos import DBOS

    @DBOS.step(retries_allowed=True, max_attempts=3, interval_seconds=0.1)
    async def ledger_call(step: int, method: str, body: bytes) -> None:
        workflow_id = DBOS.workflow_id
        action = "execute" if method == "Do" else "compensate"
        metadata = (
            ("x-saga-id", str(workflow_id)),
            ("x-saga-step", f"step-{step}"),
            ("x-idempotency-key", f"{workflow_id}/step-{step}/{action}"),
        )
        await CALLS[step][method](body, metadata=metadata, timeout=10)

    @DBOS.workflow()
    async def order_workflow(body: bytes) -> str:
        done: list[int] = []
        try:
            for step in range(len(CALLS)):
                await ledger_call(step, "Do", body)
                done.append(step)
        except Exception:
            for step in reversed(done):
                await ledger_call(step, "Undo", body)
            raise
        return "completed"

    return order_workflow


async def throughput(run_one: Any, total: int) -> float:
    remaining = iter(range(total))

    async def worker() -> None:
        for _ in remaining:
            await run_one()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return total / (time.perf_counter() - began)


async def bench(args: argparse.Namespace, address: str, plane_pid: int, system_db: str) -> dict[str, Any]:
    from dbos import DBOS, DBOSConfig

    addresses = await wait_resolvable(address)
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    CALLS[:] = [
        {
            method: channel.unary_unary(
                f"/test.v1.Ledger/{method}", request_serializer=_identity, response_deserializer=_identity
            )
            for method in ("Do", "Undo")
        }
        for channel in channels
    ]
    workflow = build_workflow()
    config: DBOSConfig = {
        "name": "bench-dbos",
        "system_database_url": system_db,
        "log_level": "WARNING",
        "enable_otlp": False,
    }
    body = wrappers_pb2.StringValue(value="order").SerializeToString()
    per: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        per.setdefault(key, []).append(value)

    @contextlib.contextmanager
    def running(name: str) -> Iterator[None]:
        """DBOS runs (its executor, its background threads) only during its own blocks."""
        if name != "dbos":
            yield
            return
        DBOS(config=config)
        DBOS.launch()
        logging.getLogger("dbos").setLevel(logging.WARNING)
        try:
            yield
        finally:
            DBOS.destroy()

    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
            await stub.RegisterDefinition(pb.RegisterDefinitionRequest(definition=definition()))

            async def saga() -> None:
                await run_saga(stub, body)

            async def dbos() -> None:
                handle = await DBOS.start_workflow_async(workflow, body)
                if await handle.get_result() != "completed":
                    raise RuntimeError("DBOS workflow did not complete")

            systems = {"rpcmesh": saga, "dbos": dbos}
            for round_ in range(args.rounds):
                for name in list(systems) if round_ % 2 == 0 else list(reversed(systems)):
                    run_one = systems[name]
                    with running(name):
                        for _ in range(20):  # warm-up, every block
                            await run_one()
                        cpu = {"client": cpu_seconds(), "plane": cpu_seconds(plane_pid)}
                        add(f"{name}_per_s", await throughput(run_one, args.sagas))
                        add(f"{name}_client_cpu_ms", (cpu_seconds() - cpu["client"]) * 1000 / args.sagas)
                        add(
                            f"{name}_plane_cpu_ms",
                            (cpu_seconds(plane_pid) - cpu["plane"]) * 1000 / args.sagas,
                        )
                        samples = []
                        for _ in range(args.latency_samples):
                            began = time.perf_counter()
                            await run_one()
                            samples.append((time.perf_counter() - began) * 1000)
                        add(f"{name}_p50_ms", statistics.median(samples))
    finally:
        for channel in channels:
            await channel.close()
    figures: dict[str, Any] = {
        "store": args.store or "sqlite",
        "rounds": args.rounds,
        "concurrency": CONCURRENCY,
    }
    for key, values in per.items():
        figures[key] = round(statistics.median(values), 3)
    figures["sagas_per_s"] = figures.pop("rpcmesh_per_s")
    figures["dbos_workflows_per_s"] = figures.pop("dbos_per_s")
    figures["saga_p50_ms"] = figures.pop("rpcmesh_p50_ms")
    figures["rate_vs_dbos"] = round(figures["sagas_per_s"] / figures["dbos_workflows_per_s"], 2)
    figures["p50_vs_dbos"] = round(figures["saga_p50_ms"] / figures["dbos_p50_ms"], 2)
    # CPU per workflow: rpcmesh's client + its control plane (SagaCoordinator); DBOS runs in the client.
    figures["cpu_ms_per_saga"] = round(
        figures.pop("rpcmesh_client_cpu_ms") + figures["rpcmesh_plane_cpu_ms"], 2
    )
    figures["dbos_cpu_ms_per_workflow"] = round(
        figures.pop("dbos_client_cpu_ms") + figures.pop("dbos_plane_cpu_ms"), 2
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["postgresql"], help="both systems' store (default: SQLite)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sagas", type=int, default=600, help="workflows per throughput round")
    parser.add_argument("--latency-samples", type=int, default=60, help="per system per round")
    args = parser.parse_args()
    try:
        import dbos  # noqa: F401
    except ImportError:
        print(json.dumps({"skipped": "dbos is not installed (pip install -e '.[bench]')"}), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        extra = plane_arguments(stack, args.store, None, "bench_saga")
        if args.store == "postgresql":
            system_db = stack.enter_context(postgres_database("bench_dbos"))
        else:
            system_db = f"sqlite:///{Path(tmp) / 'dbos.sqlite'}"
        plane, address = start_control_plane(Path(tmp) / "data", *extra)
        participants: list[ManagedProcess] = []
        try:
            participants = asyncio.run(start_participants(Path(tmp), address))
            figures = asyncio.run(bench(args, address, plane.pid, system_db))
        finally:
            for proc in participants:
                proc.kill()
            plane.kill()
    figures["dbos_version"] = _version("dbos")
    print(json.dumps(figures), flush=True)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
