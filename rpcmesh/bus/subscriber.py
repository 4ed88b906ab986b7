"""A subscriber that runs a handler per delivery and acks, naks or terminates for it.

The handler gets a :class:`Received` (the message and its attempt). Returning
acks the message; raising :class:`Terminate` dead-letters it at once; any other
exception naks it with ``"<ExceptionType>: <message>"`` as the nak's error
(the Bus redelivers after its backoff, then dead-letters after
``max_deliveries``; the dead letter shows the last error). Acks are gathered and sent in batches. When the
stream breaks (Bus restart, network) the subscriber reopens it with backoff;
deliveries that were in flight come back, so handlers must be idempotent
(at-least-once). Once the subscription has been opened, the subscriber never
gives up: an error that ends :meth:`Subscriber.run` (a non-retryable status,
say from another server briefly holding the Bus's address during a restart,
or an unexpected exception) is logged at ERROR and the subscription restarted
with backoff (:func:`rpcmesh.tasks.run_supervised`). Before it first opened,
:meth:`Subscriber.start` raises such an error instead.

Tracing: each handler call runs in a CONSUMER span (``process <topic>``) that
continues the trace found in the message headers (the publisher's PRODUCER
span is its parent, on every redelivery too), with the messaging attributes
(destination, message id, consumer group, delivery attempt); the message's
correlation id is current inside the handler (``rpcmesh.telemetry.correlation_id()``).
A handler that terminates the message, or fails on its last allowed attempt,
marks the span with a dead-letter event.

:class:`SyncSubscriber` runs a plain function per delivery from a background
thread, for scripts and threaded programs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from rpcmesh.bus.payloads import decode
from rpcmesh.errors import RpcMeshError, StatusError, from_rpc_error
from rpcmesh.tasks import run_supervised, stop_tasks
from rpcmesh.telemetry import consumer_span, record_dead_letter
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

HEALTHY_STREAM_S = 1.0
"""A stream open at least this long worked: the reconnect delay after it starts again from the first."""

MAX_ERROR_BYTES = 1024
"""Longest nak error the Bus takes (UTF-8 bytes; BusLimits.max_error_bytes)."""


def nak_error(exc: BaseException) -> str:
    """The nak error for a handler's exception: ``"<type>: <message>"``, cut to :data:`MAX_ERROR_BYTES`."""
    text = f"{type(exc).__name__}: {exc}"
    return text.encode()[:MAX_ERROR_BYTES].decode(errors="ignore")


class Terminate(RpcMeshError):
    """Raise from a handler to dead-letter the message without retrying."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Received:
    """One delivery handed to a handler."""

    message: bus_pb2.BusMessage
    """The message, headers and all."""
    attempt: int
    """1 on first delivery."""

    def payload(self, kind: type[M]) -> M:
        """The payload parsed as a protobuf message of ``kind``."""
        return decode(self.message, kind)

    @property
    def headers(self) -> dict[str, str]:
        """The message headers (traceparent, baggage, x-correlation-id...)."""
        return dict(self.message.headers)


Handler = Callable[[Received], Awaitable[object]]


@dataclass(frozen=True, kw_only=True)
class SubscriberConfig:
    """How a :class:`Subscriber` subscribes and runs its handler."""

    topic: str
    """Topic or pattern."""
    group: str = ""
    """Consumer group; empty with broadcast=True."""
    broadcast: bool = False
    """Every subscriber receives every message (no durable acks)."""
    start: str | int | datetime = "new_only"
    """Where a new group starts: ``"new_only"``, ``"earliest"``, a sequence (int, from 1, inclusive)
    or a timezone-aware time (the first message published at or after it)."""
    max_in_flight: int = 256
    """Deliveries unacknowledged at once."""
    concurrency: int = 64
    """Handlers running at once."""
    ack_deadline: float = 30.0
    """Seconds before the Bus redelivers an unacknowledged message."""
    max_deliveries: int = 5
    """Attempts before dead-lettering."""
    redelivery_backoff: float = 1.0
    """First redelivery delay."""
    ack_interval: float = 0.005
    """Seconds acks are gathered before being sent."""
    reconnect_backoff: float = 0.2
    """First delay before reopening a broken stream (doubles to 5 s)."""

    def __post_init__(self) -> None:
        if not self.topic:
            raise ValueError("topic: must not be empty")
        if self.broadcast == bool(self.group):
            raise ValueError("group: required unless broadcast=True (and empty then)")
        if isinstance(self.start, bool) or not isinstance(self.start, str | int | datetime):
            raise ValueError(
                f"start: must be 'new_only', 'earliest', a sequence or a datetime, got {self.start!r}"
            )
        if isinstance(self.start, str) and self.start not in ("new_only", "earliest"):
            raise ValueError(f"start: must be 'new_only' or 'earliest', got {self.start!r}")
        if isinstance(self.start, int) and self.start < 1:
            raise ValueError(f"start: a sequence must be >= 1, got {self.start}")
        if isinstance(self.start, datetime) and self.start.tzinfo is None:
            raise ValueError("start: the time must be timezone-aware")
        if self.max_in_flight < 1 or self.concurrency < 1:
            raise ValueError("max_in_flight and concurrency: must be >= 1")

    def options(self) -> bus_pb2.SubscriptionOptions:
        """The first Subscribe request."""
        options = bus_pb2.SubscriptionOptions(
            topic=self.topic,
            group=self.group,
            mode=bus_pb2.DELIVERY_MODE_BROADCAST if self.broadcast else bus_pb2.DELIVERY_MODE_GROUP,
            max_in_flight=self.max_in_flight,
            max_deliveries=self.max_deliveries,
        )
        if isinstance(self.start, datetime):
            options.start.time.FromDatetime(self.start)
        elif isinstance(self.start, int):
            options.start.sequence = self.start
        elif self.start == "earliest":
            options.start.earliest = True
        else:
            options.start.new_only = True
        options.ack_deadline.FromNanoseconds(int(self.ack_deadline * 1e9))
        options.redelivery_backoff.FromNanoseconds(int(self.redelivery_backoff * 1e9))
        return options


class Subscriber:
    """Runs ``handler`` for every delivery (see module docstring).

    Usage::

        subscriber = Subscriber(channel, SubscriberConfig(topic="orders.*", group="billing"), handle)
        await subscriber.start()
        ...
        await subscriber.stop()
    """

    def __init__(self, channel: grpc.aio.Channel, config: SubscriberConfig, handler: Handler) -> None:
        self._stub = bus_pb2_grpc.BusStub(channel)
        self.config = config
        self.handler = handler
        self._task: asyncio.Task[None] | None = None
        self._opened = asyncio.Event()
        self._opened_at: float | None = None
        self._ever_opened = False
        self.error: StatusError | None = None
        """The last error that ended a stream."""

    async def start(self, wait_open: float | None = 10.0) -> None:
        """Start the subscription; waits until the Bus confirmed it (None: do not wait).

        An error before the subscription first opened (a bad topic, a refusal) ends it and is
        raised here; after that the subscription is supervised and never ends on its own.
        """
        self._task = asyncio.create_task(self._supervise(), name=f"bus-subscriber-{self.config.topic}")
        if wait_open is not None:
            opened = asyncio.create_task(self._opened.wait())
            done, _ = await asyncio.wait(
                {opened, self._task}, timeout=wait_open, return_when="FIRST_COMPLETED"
            )
            if self._task in done:
                opened.cancel()
                self._task.result()
            if not done:
                opened.cancel()
                raise TimeoutError(f"subscription to {self.config.topic!r} not opened within {wait_open} s")

    async def stop(self) -> None:
        """End the subscription; handlers still running are cancelled (their messages come back)."""
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None

    async def _supervise(self) -> None:
        """Run the subscription; once it has opened, restart it whenever it ends with an error."""
        try:
            await self.run()
            return
        except Exception:
            if not self._ever_opened:
                raise  # surfaces in start(): the subscription never worked
            logger.exception("bus subscription to %s failed; restarting it", self.config.topic)
        await run_supervised(
            self.run,
            name=f"bus-subscriber-{self.config.topic}",
            initial_delay=self.config.reconnect_backoff,
            max_delay=max(5.0, self.config.reconnect_backoff),
        )

    async def run(self) -> None:
        """Subscribe until cancelled, reopening broken streams; non-retryable errors are raised.

        A stream that ends or fails in any other way than a status (e.g. an
        ``asyncio.InvalidStateError`` from a call that already finished) counts as broken.
        """
        loop = asyncio.get_running_loop()
        delay = self.config.reconnect_backoff
        while True:
            self._opened_at = None
            why = "ended"
            try:
                await self._run_once()
            except grpc.aio.AioRpcError as exc:
                self.error = from_rpc_error(exc)
                if exc.code() not in RETRYABLE:
                    raise self.error from exc
                why = exc.code().name
            except (asyncio.InvalidStateError, grpc.RpcError) as exc:
                why = repr(exc)
            finally:
                self._opened.clear()
            opened_for = loop.time() - self._opened_at if self._opened_at is not None else 0.0
            if opened_for >= HEALTHY_STREAM_S:
                delay = self.config.reconnect_backoff  # it worked: a new outage starts a new backoff
            logger.info(
                "bus subscription to %s broke (%s) after %.1fs open; reopening in %.2fs",
                self.config.topic,
                why,
                opened_for,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _traced(self, delivery: bus_pb2.Delivery) -> None:
        message = delivery.message
        config = self.config
        with consumer_span(
            message.topic,
            message.headers,
            message_id=message.id or None,
            consumer_group=config.group or None,
            delivery_attempt=delivery.attempt,
        ):
            try:
                await self.handler(Received(message, delivery.attempt))
            except Terminate as exc:
                record_dead_letter(
                    exc.reason, attempts=delivery.attempt, dead_letter_topic=self._dead(message)
                )
                raise
            except Exception:
                last = 0 < config.max_deliveries <= delivery.attempt
                if last and not config.broadcast:
                    record_dead_letter(
                        "max_deliveries", attempts=delivery.attempt, dead_letter_topic=self._dead(message)
                    )
                raise

    def _dead(self, message: bus_pb2.BusMessage) -> str | None:
        return f"$dlq.{message.topic}.{self.config.group}" if self.config.group else None

    async def _run_once(self) -> None:
        requests: asyncio.Queue[bus_pb2.SubscribeRequest | None] = asyncio.Queue()
        requests.put_nowait(bus_pb2.SubscribeRequest(open=self.config.options()))

        async def iterate() -> AsyncIterator[bus_pb2.SubscribeRequest]:
            while (request := await requests.get()) is not None:
                yield request

        acks: list[bus_pb2.MessageRef] = []
        ack_ready = asyncio.Event()
        slots = asyncio.Semaphore(self.config.concurrency)
        handlers: set[asyncio.Task[None]] = set()

        async def send_acks() -> None:
            while True:
                await ack_ready.wait()
                await asyncio.sleep(self.config.ack_interval)
                ack_ready.clear()
                refs = acks[:]
                acks.clear()
                if refs:
                    requests.put_nowait(bus_pb2.SubscribeRequest(ack=bus_pb2.Ack(refs=refs)))

        async def handle(delivery: bus_pb2.Delivery) -> None:
            ref = bus_pb2.MessageRef(topic=delivery.message.topic, sequence=delivery.message.sequence)
            try:
                await self._traced(delivery)
            except Terminate as exc:
                requests.put_nowait(
                    bus_pb2.SubscribeRequest(term=bus_pb2.Term(refs=[ref], reason=exc.reason))
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.exception("handler failed on %s#%d", ref.topic, ref.sequence)
                nak = bus_pb2.Nak(refs=[ref], error=nak_error(exc))
                requests.put_nowait(bus_pb2.SubscribeRequest(nak=nak))
            else:
                acks.append(ref)
                ack_ready.set()
            finally:
                slots.release()

        call = self._stub.Subscribe(iterate())
        acker = asyncio.create_task(send_acks())
        try:
            async for response in call:
                if response.opened:
                    self._ever_opened = True
                    self._opened_at = asyncio.get_running_loop().time()
                    self._opened.set()
                for delivery in response.deliveries:
                    await slots.acquire()
                    task = asyncio.create_task(handle(delivery))
                    handlers.add(task)
                    task.add_done_callback(handlers.discard)
        finally:
            # The end of the requests: gRPC's task pumping them is cancelled by call.cancel() only
            # while the call is live; after a broken stream it would wait on the queue forever.
            requests.put_nowait(None)
            call.cancel()
            acker.cancel()
            for task in list(handlers):
                task.cancel()
            await asyncio.gather(acker, *handlers, return_exceptions=True)


SyncHandler = Callable[[Received], object]


class SyncSubscriber:
    """A :class:`Subscriber` for threaded code: runs a plain function per delivery.

    The subscription runs on its own event loop in a background thread; ``handler``
    runs in a worker thread per delivery (at most ``config.concurrency`` at once), so
    it may block. It takes the same address as a blocking channel would (the
    subscription needs a ``grpc.aio`` channel of its own, made in that thread).

    Usage::

        with SyncSubscriber("127.0.0.1:7000", SubscriberConfig(topic="jobs", group="w"), handle):
            ...  # handle(received) runs for every delivery
    """

    def __init__(
        self,
        target: str,
        config: SubscriberConfig,
        handler: SyncHandler,
        *,
        channel_factory: Callable[[str], grpc.aio.Channel] | None = None,
    ) -> None:
        self.target = target
        self.config = config
        self.handler = handler
        self._channel_factory = channel_factory or grpc.aio.insecure_channel
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.subscriber: Subscriber | None = None

    def __enter__(self) -> SyncSubscriber:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, wait_open: float = 10.0) -> None:
        """Start the background thread; returns once the Bus confirmed the subscription."""
        self._thread = threading.Thread(
            target=self._main, name=f"bus-subscriber-{self.config.topic}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(wait_open + 5.0):
            raise TimeoutError(f"subscription to {self.config.topic!r} not opened within {wait_open} s")
        if self._failure is not None:
            self._thread.join()
            raise self._failure

    def stop(self) -> None:
        """End the subscription and the thread (handlers still running are abandoned)."""
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopped.set)
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()

        async def run_handler(received: Received) -> None:
            await asyncio.to_thread(self.handler, received)

        channel = self._channel_factory(self.target)
        try:
            self.subscriber = Subscriber(channel, self.config, run_handler)
            try:
                await self.subscriber.start()
            except BaseException as exc:
                self._failure = exc
                return
            finally:
                self._ready.set()
            await self._stopped.wait()
            await self.subscriber.stop()
        finally:
            await channel.close()
