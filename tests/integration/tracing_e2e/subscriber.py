"""Subscriber C of the end-to-end trace test: a process using ``rpcmesh.bus.Subscriber``.

    python subscriber.py --address HOST:PORT --topic TOPIC --group GROUP

Telemetry comes from the ``OTEL_*`` variables. Each delivered message prints
``received <payload> <correlation id>``; ``ready`` once the subscription is confirmed.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc.aio

from rpcmesh.bus import Received, Subscriber, SubscriberConfig
from rpcmesh.telemetry import TelemetryConfig, correlation_id, setup_telemetry


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", default="c")
    args = parser.parse_args()
    telemetry = setup_telemetry(TelemetryConfig.from_env())

    async def handle(item: Received) -> None:
        print(f"received {item.message.payload.decode()} {correlation_id()}", flush=True)

    try:
        async with grpc.aio.insecure_channel(args.address) as channel:
            config = SubscriberConfig(topic=args.topic, group=args.group, start="earliest")
            subscriber = Subscriber(channel, config, handle)
            await subscriber.start()
            print("ready", flush=True)
            await asyncio.Event().wait()
    finally:
        await asyncio.to_thread(telemetry.shutdown)


if __name__ == "__main__":
    asyncio.run(main())
