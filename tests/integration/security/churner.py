"""Abusive client for the churn test: opens and cancels Watch streams as fast as it can, for a bounded time.

Run as ``python -m tests.integration.security.churner ADDRESS CA_FILE TOKEN SECONDS``; prints one JSON
line with how many streams it opened and which status codes it saw. Loopback only.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from pathlib import Path

import grpc
import grpc.aio
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from rpcmesh.security.client import ClientSecurity, aio_channel
from rpcmesh.security.tls import ClientTlsConfig

CONCURRENCY = 64


async def main(address: str, ca_file: str, token: str, seconds: float) -> None:
    assert address.startswith(("127.0.0.1:", "localhost:")), "loopback only"
    security = ClientSecurity(tls=ClientTlsConfig(ca_file=Path(ca_file)), token=token)
    channel = aio_channel(address, security)
    stub = registry_pb2_grpc.RegistryStub(channel)
    deadline = time.monotonic() + seconds
    opened = 0
    codes: collections.Counter[str] = collections.Counter()

    async def loop(index: int) -> None:
        nonlocal opened
        while time.monotonic() < deadline:
            call = stub.Watch(registry_pb2.WatchRequest(), timeout=5)
            opened += 1
            try:
                if index % 2:
                    await call.read()  # cancel after the snapshot...
                call.cancel()  # ...or right away
                codes[(await call.code()).name] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
            except asyncio.CancelledError:
                codes["CANCELLED"] += 1

    await asyncio.gather(*(loop(i) for i in range(CONCURRENCY)))
    await channel.close()
    print(json.dumps({"opened": opened, "codes": dict(codes)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
