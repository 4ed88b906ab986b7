"""Worker processes for the Bus fault tests (run with ``python -m tests.integration.bus.workers``).

``subscribe ADDRESS TOPIC GROUP OUTFILE MAX_IN_FLIGHT``: records every delivered
payload as a line in OUTFILE (before acking it), forever.
``respond ADDRESS TOPIC``: answers every request with its own payload.
Both print ``ready`` once the Bus confirmed the subscription.
"""

from __future__ import annotations

import asyncio
import os
import sys

import grpc.aio

from rpcmesh.bus import Received, Responder, Subscriber, SubscriberConfig


async def subscribe(address: str, topic: str, group: str, outfile: str, max_in_flight: int) -> None:
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


def main(argv: list[str]) -> None:
    if argv[0] == "subscribe":
        asyncio.run(subscribe(argv[1], argv[2], argv[3], argv[4], int(argv[5])))
    elif argv[0] == "respond":
        asyncio.run(respond(argv[1], argv[2]))
    else:
        raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
