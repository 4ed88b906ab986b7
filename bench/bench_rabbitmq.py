"""RabbitMQ peer of ``bench_bus.py``: durable publish -> deliver -> ack through aio-pika.

Used by ``bench_bus.py`` (``--peers ...,rabbitmq``), not run on its own. The same phases and the
same freedoms as the Bus and JetStream there:

* publish: persistent messages (``delivery_mode=2``) to a durable queue through the default
  exchange on a channel with publisher confirms; at most ``window`` publishes unconfirmed at once
  (each publish awaits its own confirm, so the window is what is in flight). Counted until every
  confirm arrived.
* deliver: a consumer with ``prefetch_count=window`` reads the queue and acks with
  ``multiple=True`` every ``ack_every`` messages (and the last one): batched acks, as the Bus
  (acks per delivered batch) and JetStream (``AckPolicy.ALL``) do.

Durability: the queue is a quorum queue by default (``--rabbitmq-queue classic`` for a classic
durable queue). RabbitMQ confirms a persistent message to a durable queue only once it is written
and fsync-ed; both queue types fsync per batch of writes (the quorum queue's Raft log before it
confirms), so this is "fsync per commit", like the Bus (SQLite ``synchronous=FULL``).

Requires ``aio-pika`` (``aio-pika>=9.4,<10``) and a RabbitMQ at ``--rabbitmq`` (default
``amqp://guest:guest@127.0.0.1:5672/``, or ``RPCMESH_TEST_RABBITMQ``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

PERSISTENT = 2  # AMQP delivery_mode of a persistent message


class RabbitMQPeer:
    """Durable queues on one RabbitMQ connection (see the module docstring)."""

    label = "rabbitmq"

    def __init__(self, url: str, payload: bytes, queue_type: str = "quorum") -> None:
        self.url = url
        self.payload = payload
        self.queue_type = queue_type
        self.durability = (
            f"{queue_type} durable queue, persistent messages, publisher confirms (fsync before confirm)"
        )
        self._connection: Any = None
        self._channel: Any = None

    async def open(self) -> None:
        import aio_pika

        self._connection = await aio_pika.connect(self.url)
        self._channel = await self._connection.channel(publisher_confirms=True)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def prepare(self, topic: str) -> None:
        arguments = {"x-queue-type": self.queue_type} if self.queue_type == "quorum" else {}
        await self._channel.declare_queue(topic, durable=True, arguments=arguments)

    async def drop(self, topic: str) -> None:
        await self._channel.queue_delete(topic)

    async def publish(self, topic: str, count: int, window: int, batch: int) -> float:
        """Seconds to publish ``count`` messages, ``window`` unconfirmed at most (no batch API)."""
        import aio_pika

        exchange = self._channel.default_exchange
        limit = asyncio.Semaphore(window)
        failures: list[BaseException] = []

        def done(task: asyncio.Task[Any]) -> None:
            limit.release()
            if not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())  # type: ignore[arg-type]

        tasks: set[asyncio.Task[Any]] = set()
        started = time.perf_counter()
        for _ in range(count):
            await limit.acquire()
            message = aio_pika.Message(self.payload, delivery_mode=aio_pika.DeliveryMode(PERSISTENT))
            task = asyncio.ensure_future(exchange.publish(message, routing_key=topic))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(done)
        if tasks:
            await asyncio.wait(set(tasks))
        elapsed = time.perf_counter() - started
        if failures:
            raise failures[0]
        return elapsed

    async def deliver(self, topic: str, count: int, window: int, ack_every: int) -> float:
        """Seconds to receive and ack ``count`` messages (prefetch ``window``, acks ``multiple``)."""
        channel = await self._connection.channel()
        try:
            await channel.set_qos(prefetch_count=window)
            queue = await channel.get_queue(topic, ensure=False)
            received = 0
            finished = asyncio.get_running_loop().create_future()

            async def on_message(message: Any) -> None:
                nonlocal received
                received += 1
                if received % ack_every == 0 or received >= count:
                    await message.ack(multiple=True)
                if received >= count and not finished.done():
                    finished.set_result(None)

            started = time.perf_counter()
            tag = await queue.consume(on_message)
            await asyncio.wait_for(finished, 120)
            elapsed = time.perf_counter() - started
            await queue.cancel(tag)
            return elapsed
        finally:
            await channel.close()
