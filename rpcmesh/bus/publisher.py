"""A batching publisher over ``Bus.PublishStream``.

``await publisher.publish(topic, payload)`` returns once the message is durable.
Concurrent publishes are gathered into batches (up to ``max_batch`` messages or
``linger`` seconds) and streamed; the Bus answers each batch in order, which
resolves every caller's future. One gRPC message carries many bus messages, so
the rate is not bound by per-message RPC overhead.

Tracing: every publish runs in a PRODUCER span (``publish <topic>``) that lasts
until the message is durable, and writes the trace context (``traceparent``,
``baggage``) and the correlation id (``x-correlation-id``; the current one, or
a new one) into the message headers, replacing any the caller put there.
Subscribers continue the trace from those headers.

When the stream breaks (a Bus restart, the network, or any exception from the
call, not only an error status) every batch in flight fails its callers with
the error, nothing is left waiting, and the next publish opens a new stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import grpc
import grpc.aio
from google.protobuf.message import Message

from rpcmesh.bus.payloads import encode
from rpcmesh.errors import (
    RpcMeshError,
    StatusError,
    UnavailableError,
    code_from_value,
    from_rpc_error,
    from_status,
)
from rpcmesh.tasks import stop_tasks
from rpcmesh.telemetry import inject_message_headers, producer_span
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc


@dataclass(frozen=True, kw_only=True)
class PublisherConfig:
    """How a :class:`Publisher` batches."""

    max_batch: int = 1000
    """Most messages per batch on the wire."""

    linger: float = 0.001
    """Seconds a batch waits for more messages before it is sent."""

    max_outstanding_batches: int = 16
    """Batches sent and not yet acknowledged before publish() waits."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {self.max_batch}")
        if self.linger < 0:
            raise ValueError(f"linger: must be >= 0, got {self.linger}")
        if self.max_outstanding_batches < 1:
            raise ValueError(f"max_outstanding_batches: must be >= 1, got {self.max_outstanding_batches}")


def build_message(
    payload: Message | bytes | str,
    *,
    key: str = "",
    headers: Mapping[str, str] | None = None,
    id: str = "",
    content_type: str = "",
) -> bus_pb2.BusMessage:
    """A BusMessage from a typed or raw payload."""
    data, kind = encode(payload, content_type)
    return bus_pb2.BusMessage(id=id, key=key, headers=dict(headers or {}), payload=data, content_type=kind)


class Publisher:
    """Batches publishes onto one PublishStream (see module docstring).

    Usage::

        async with Publisher(channel) as publisher:
            result = await publisher.publish("orders.created", order)
    """

    def __init__(self, channel: grpc.aio.Channel, config: PublisherConfig | None = None) -> None:
        self._stub = bus_pb2_grpc.BusStub(channel)
        self.config = config or PublisherConfig()
        self._pending: dict[str, list[tuple[bus_pb2.BusMessage, asyncio.Future[bus_pb2.PublishResult]]]] = {}
        self._ids = itertools.count(1)
        self._requests: asyncio.Queue[bus_pb2.PublishStreamRequest | None] | None = None
        self._inflight: dict[int, list[asyncio.Future[bus_pb2.PublishResult]]] = {}
        self._slots = asyncio.Semaphore(self.config.max_outstanding_batches)
        self._flusher: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._call: (
            grpc.aio.StreamStreamCall[bus_pb2.PublishStreamRequest, bus_pb2.PublishStreamResponse] | None
        )
        self._call = None
        self._wake = asyncio.Event()
        self._closed = False

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def publish(
        self,
        topic: str,
        payload: Message | bytes | str,
        *,
        key: str = "",
        headers: Mapping[str, str] | None = None,
        id: str = "",
        content_type: str = "",
    ) -> bus_pb2.PublishResult:
        """Publish one message; returns once it is durable (with its sequence)."""
        message = build_message(payload, key=key, headers=headers, id=id, content_type=content_type)
        return await self.publish_message(topic, message)

    async def publish_message(self, topic: str, message: bus_pb2.BusMessage) -> bus_pb2.PublishResult:
        """Publish a prepared BusMessage (its trace headers are written here)."""
        if self._closed:
            raise RpcMeshError("publisher is closed")
        with producer_span(topic, message.headers, message_id=message.id or None):
            future: asyncio.Future[bus_pb2.PublishResult] = asyncio.get_running_loop().create_future()
            batch = self._pending.setdefault(topic, [])
            batch.append((message, future))
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush_loop())
            if len(batch) >= self.config.max_batch:
                self._wake.set()
            return await future

    async def _flush_loop(self) -> None:
        while self._pending:
            if self.config.linger:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.linger)
            self._wake.clear()
            for topic in list(self._pending):
                items = self._pending.pop(topic)
                for start in range(0, len(items), self.config.max_batch):
                    batch = items[start : start + self.config.max_batch]
                    try:
                        await self._send(topic, batch)
                    except Exception as exc:
                        # Fail these callers rather than leave them waiting; the loop goes on.
                        _fail([future for _, future in batch], UnavailableError(f"publish failed: {exc!r}"))
            await asyncio.sleep(0)

    def _ensure_stream(self) -> asyncio.Queue[bus_pb2.PublishStreamRequest | None]:
        if self._requests is None or self._reader is None or self._reader.done():
            requests: asyncio.Queue[bus_pb2.PublishStreamRequest | None] = asyncio.Queue()

            async def iterate() -> AsyncIterator[bus_pb2.PublishStreamRequest]:
                while True:
                    item = await requests.get()
                    if item is None:
                        return
                    yield item

            self._requests = requests
            self._call = self._stub.PublishStream(iterate())
            self._reader = asyncio.create_task(self._read(self._call, requests))
        return self._requests

    async def _send(
        self, topic: str, items: list[tuple[bus_pb2.BusMessage, asyncio.Future[bus_pb2.PublishResult]]]
    ) -> None:
        await self._slots.acquire()
        try:
            requests = self._ensure_stream()
        except BaseException:
            self._slots.release()  # the batch never went out: its slot is free again
            raise
        batch_id = next(self._ids)
        self._inflight[batch_id] = [future for _, future in items]
        requests.put_nowait(
            # partial: a bad message fails only its own caller, not the batch it shares.
            bus_pb2.PublishStreamRequest(
                topic=topic, batch_id=batch_id, messages=[m for m, _ in items], partial=True
            )
        )

    async def _read(
        self,
        call: grpc.aio.StreamStreamCall[bus_pb2.PublishStreamRequest, bus_pb2.PublishStreamResponse],
        requests: asyncio.Queue[bus_pb2.PublishStreamRequest | None],
    ) -> None:
        error: RpcMeshError | None = None
        try:
            async for response in call:
                futures = self._inflight.pop(response.batch_id, [])
                self._slots.release()
                for future, result in zip(futures, response.results, strict=False):
                    if future.done():
                        continue
                    if result.code:
                        future.set_exception(from_status(code_from_value(result.code), result.error))
                    else:
                        future.set_result(result)
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
        except StatusError as exc:
            error = exc
        except asyncio.CancelledError:
            error = RpcMeshError("publisher closed")
        except Exception as exc:
            # Any other failure of the stream (e.g. asyncio.InvalidStateError) is a broken stream too.
            error = UnavailableError(f"publish stream failed: {exc!r}")
        if error is None:
            error = UnavailableError("publish stream ended")
        # End this stream's requests: after a broken stream gRPC's task pumping them would otherwise
        # wait on the queue forever (one leaked task per broken stream).
        requests.put_nowait(None)
        for futures in self._inflight.values():
            self._slots.release()
            _fail(futures, error)
        self._inflight.clear()
        if self._requests is requests:  # a newer stream may already have replaced this one
            self._requests = None

    async def flush(self) -> None:
        """Wait until everything published so far is acknowledged."""
        while self._pending or self._inflight:
            self._wake.set()
            await asyncio.sleep(0.001)

    async def close(self) -> None:
        """Flush and end the stream."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        if self._requests is not None:
            self._requests.put_nowait(None)
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._flusher is not None:
            await stop_tasks([self._flusher])


def _fail(futures: list[asyncio.Future[bus_pb2.PublishResult]], error: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)


class SyncPublisher:
    """Publish from threads or scripts over a blocking ``grpc.Channel`` (one Publish call per batch)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = bus_pb2_grpc.BusStub(channel)

    def publish(
        self,
        topic: str,
        payload: Message | bytes | str,
        *,
        key: str = "",
        headers: Mapping[str, str] | None = None,
        id: str = "",
        content_type: str = "",
        timeout: float | None = 10.0,
    ) -> bus_pb2.PublishResult:
        """Publish one message; returns once it is durable."""
        message = build_message(payload, key=key, headers=headers, id=id, content_type=content_type)
        return self.publish_batch(topic, [message], timeout=timeout)[0]

    def publish_batch(
        self, topic: str, messages: list[bus_pb2.BusMessage], *, timeout: float | None = 10.0
    ) -> list[bus_pb2.PublishResult]:
        """Publish prepared messages in one call, in one PRODUCER span (each message points at it)."""
        with producer_span(topic, batch_size=len(messages) if len(messages) > 1 else None):
            for message in messages:
                inject_message_headers(message.headers)
            try:
                response = self._stub.Publish(
                    bus_pb2.PublishRequest(topic=topic, messages=messages), timeout=timeout
                )
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from exc
        return list(response.results)
