"""What the parts of the partition workload share: context, node rotation, recorded calls, guarded streams.

See :mod:`tests.partitions.workload` for the workload itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from tests.partitions.history import HistoryWriter, Op, classify

__all__ = [
    "CALL_TIMEOUT",
    "Context",
    "Cursor",
    "Probe",
    "duration",
    "guarded",
    "record_call",
    "registry_probe",
]

CALL_TIMEOUT = 2.0
"""Deadline of each unary operation (s)."""

T = TypeVar("T")

_CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 3_000),
]

logger = logging.getLogger("tests.partitions.workload")


@dataclass
class Context:
    """What every workload task shares: the nodes, the history, the stop signal."""

    nodes: list[str]
    history: HistoryWriter
    run: str
    """Short id of this run, in every stream, topic and key name (runs never collide)."""
    rng: random.Random
    listen_host: str
    """Address the workload's own participant services listen on and register."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    def channel(self, node: str) -> grpc.aio.Channel:
        """One channel per node, shared by the tasks (calls multiplex on it)."""
        if node not in self.channels:
            self.channels[node] = grpc.aio.insecure_channel(node, options=_CHANNEL_OPTIONS)
        return self.channels[node]

    def private_channel(self, node: str) -> grpc.aio.Channel:
        """A channel of its own (for a stream that must be torn down alone)."""
        return grpc.aio.insecure_channel(node, options=_CHANNEL_OPTIONS)

    async def sleep(self, seconds: float) -> bool:
        """Sleep, but wake when the run stops; True while it runs."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)
        return not self.stop.is_set()

    async def close(self) -> None:
        """Close the shared channels."""
        for channel in self.channels.values():
            await channel.close()
        self.channels.clear()


class Cursor:
    """A worker's current node; :meth:`rotate` moves to the next one after an ambiguous failure."""

    def __init__(self, nodes: list[str], start: int) -> None:
        self.nodes = nodes
        self.index = start % len(nodes)

    @property
    def node(self) -> str:
        """The node to call now."""
        return self.nodes[self.index]

    def rotate(self) -> None:
        """Move to the next node."""
        self.index = (self.index + 1) % len(self.nodes)


async def record_call(
    ctx: Context,
    proc: str,
    op: str,
    node: str,
    call: Callable[[], Awaitable[T]],
    args: dict[str, Any],
    result: Callable[[Any], dict[str, Any]],
) -> tuple[Op, T | None]:
    """Run one unary operation and append it to the history with its outcome."""
    invoke = time.monotonic()
    try:
        response = await call()
    except (grpc.RpcError, TimeoutError) as exc:
        outcome, error = classify(exc)
        return ctx.history.record(proc, op, invoke, outcome=outcome, args=args, error=error, node=node), None
    return ctx.history.record(proc, op, invoke, args=args, result=result(response), node=node), response


def duration(seconds: float) -> duration_pb2.Duration:
    """A protobuf Duration of ``seconds``."""
    value = duration_pb2.Duration()
    value.FromMilliseconds(round(seconds * 1000))
    return value


Probe = Callable[[grpc.aio.Channel], Awaitable[Any]]
"""A cheap unary call that shows a node still serves what a stream needs."""


async def registry_probe(channel: grpc.aio.Channel) -> Any:
    """ListServices: the node answers Registry reads."""
    stub = registry_pb2_grpc.RegistryStub(channel)
    return await stub.ListServices(registry_pb2.ListServicesRequest(page_size=1), timeout=1.5)


async def _stream_guard(ctx: Context, node: str, task: asyncio.Task[Any], probe: Probe) -> None:
    """Cancel ``task`` (a stream on ``node``) when two probes in a row fail: the node is out of reach."""
    failures = 0
    while not task.done():
        await asyncio.sleep(1.0)
        try:
            await probe(ctx.channel(node))
            failures = 0
        except grpc.RpcError:
            failures += 1
            if failures >= 2:
                task.cancel()
                return


async def guarded(
    ctx: Context,
    node: str,
    stream: Awaitable[None],
    probe: Probe = registry_probe,
    stop: asyncio.Event | None = None,
) -> str | None:
    """Run a stream consumer until it ends, ``stop`` (the run's) is set or the node fails its probes.

    Returns the error ("CODE: message") it ended with, None when it was stopped.
    """
    stop = ctx.stop if stop is None else stop
    task = asyncio.ensure_future(stream)
    guard = asyncio.create_task(_stream_guard(ctx, node, task, probe))
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return None if stop.is_set() else "UNAVAILABLE: probes to the node failed"
        except (grpc.RpcError, TimeoutError) as exc:
            return classify(exc)[1]
        return "UNAVAILABLE: stream ended"
    finally:
        guard.cancel()
        stopper.cancel()
