"""A tiny service process for fault tests: serves grpc.health, registers, and keeps its lease alive.

Usage: python lease_holder.py REGISTRY_ADDRESS TTL_SECONDS PROBE_INTERVAL_SECONDS

Prints ``registered <instance_id> <lease_id>`` once registered and
``keepalive code=<N>`` for every KeepAlive answer, using raw stubs only.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc


def _duration(seconds: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(seconds), nanos=round((seconds % 1) * 1e9))


async def main(registry_address: str, ttl: float, probe_interval: float) -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"listening on 127.0.0.1:{port}", flush=True)
    async with grpc.aio.insecure_channel(registry_address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        check = registry_pb2.GrpcHealthCheck(
            interval=_duration(probe_interval),
            timeout=_duration(min(probe_interval, 1.0)),
            failures_before_critical=1,
        )
        reg = await stub.Register(
            registry_pb2.RegisterRequest(
                instance=registry_pb2.Instance(
                    service="holder", address=f"127.0.0.1:{port}", health_check=check
                ),
                ttl=_duration(ttl),
            )
        )
        print(f"registered {reg.instance_id} {reg.lease_id}", flush=True)
        stream = stub.KeepAlive()
        while True:
            await stream.write(
                registry_pb2.KeepAliveRequest(lease_id=reg.lease_id, lease_token=reg.lease_token)
            )
            answer = await stream.read()
            print(f"keepalive code={answer.code}", flush=True)
            await asyncio.sleep(ttl / 4)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
