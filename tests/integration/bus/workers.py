"""Worker processes for the Bus fault tests (run with ``python -m tests.integration.bus.workers``).

``subscribe ADDRESS TOPIC GROUP OUTFILE MAX_IN_FLIGHT [ACK_DEADLINE]``: records every
delivered payload as a line in OUTFILE (before acking it), forever.
``respond ADDRESS TOPIC``: answers every request with its own payload.
Both print ``ready`` once the Bus confirmed the subscription.

With OpenTelemetry from the ``OTEL_*`` variables (exporting to the test's collector):
``traced-subscribe ADDRESS TOPIC GROUP OUTFILE``: records ``payload attempt correlation_id``
per delivery; fails attempt 1 of payloads starting with ``fail`` (nak, redelivery) and
terminates payloads starting with ``dead`` (dead letter).
``traced-publish ADDRESS TOPIC CORRELATION PAYLOAD...``: publishes each payload under the
correlation id, flushes telemetry and prints ``published``.
"""

from __future__ import annotations

import asyncio
import os
import sys

import grpc.aio

from rpcmesh.bus import Publisher, Received, Responder, Subscriber, SubscriberConfig, Terminate
from rpcmesh.telemetry import TelemetryConfig, correlation_id, setup_telemetry, use_correlation_id


async def subscribe(
    address: str, topic: str, group: str, outfile: str, max_in_flight: int, ack_deadline: float = 30.0
) -> None:
    fd = os.open(outfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def record(item: Received) -> None:
        os.write(fd, item.message.payload + b"\n")

    async with grpc.aio.insecure_channel(address) as channel:
        config = SubscriberConfig(
            topic=topic,
            group=group,
            start="earliest",
            max_in_flight=max_in_flight,
            concurrency=max_in_flight,
            max_deliveries=1000,
            ack_deadline=ack_deadline,
            redelivery_backoff=0.1,
        )
        subscriber = Subscriber(channel, config, record)
        await subscriber.start()
        print("ready", flush=True)
        await asyncio.Event().wait()


async def respond(address: str, topic: str) -> None:
    async def echo(item: Received) -> bytes:
        return item.message.payload

    async with grpc.aio.insecure_channel(address) as channel:
        responder = Responder(channel, topic, echo)
        await responder.start()
        print("ready", flush=True)
        await asyncio.Event().wait()


async def traced_subscribe(address: str, topic: str, group: str, outfile: str) -> None:
    setup_telemetry(TelemetryConfig.from_env())
    fd = os.open(outfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def record(item: Received) -> None:
        payload = item.message.payload.decode()
        os.write(fd, f"{payload} {item.attempt} {correlation_id()}\n".encode())
        if payload.startswith("fail") and item.attempt == 1:
            raise RuntimeError("first attempt fails")
        if payload.startswith("dead"):
            raise Terminate("poison")

    async with grpc.aio.insecure_channel(address) as channel:
        config = SubscriberConfig(topic=topic, group=group, start="earliest", redelivery_backoff=0.05)
        subscriber = Subscriber(channel, config, record)
        await subscriber.start()
        print("ready", flush=True)
        await asyncio.Event().wait()


async def traced_publish(address: str, topic: str, correlation: str, payloads: list[str]) -> None:
    telemetry = setup_telemetry(TelemetryConfig.from_env())
    async with grpc.aio.insecure_channel(address) as channel, Publisher(channel) as publisher:
        with use_correlation_id(correlation):
            for payload in payloads:
                await publisher.publish(topic, payload.encode())
    await asyncio.to_thread(telemetry.shutdown)
    print("published", flush=True)


def main(argv: list[str]) -> None:
    if argv[0] == "subscribe":
        deadline = float(argv[6]) if len(argv) > 6 else 30.0
        asyncio.run(subscribe(argv[1], argv[2], argv[3], argv[4], int(argv[5]), deadline))
    elif argv[0] == "respond":
        asyncio.run(respond(argv[1], argv[2]))
    elif argv[0] == "traced-subscribe":
        asyncio.run(traced_subscribe(argv[1], argv[2], argv[3], argv[4]))
    elif argv[0] == "traced-publish":
        asyncio.run(traced_publish(argv[1], argv[2], argv[3], argv[4:]))
    else:
        raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
