"""The Bus helpers over a ``rpcmesh.client.Mesh`` channel.

A real use: several control planes serving one Bus (on NATS) are registered as
one service, and clients reach whichever is up through the mesh (discovery,
balancing, breakers). The control plane does not register itself; here the
test registers it, as a deployment (or a service host) would.
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from rpcmesh.bus import Publisher, Received, Responder, Subscriber, SubscriberConfig, request
from rpcmesh.client import Mesh
from tests.support.processes import ManagedProcess


async def test_publisher_subscriber_and_request_over_a_mesh_channel(
    control_plane: tuple[ManagedProcess, str],
) -> None:
    _, address = control_plane
    async with grpc.aio.insecure_channel(address) as plain:
        await registry_pb2_grpc.RegistryStub(plain).Register(
            registry_pb2.RegisterRequest(
                instance=registry_pb2.Instance(service="rpcmesh-bus", instance_id="cp-1", address=address),
                ttl=duration_pb2.Duration(seconds=60),
            )
        )
    received: list[bytes] = []
    done = asyncio.Event()

    async def handle(item: Received) -> None:
        received.append(item.message.payload)
        if len(received) == 20:
            done.set()

    async def echo(item: Received) -> bytes:
        return b"re:" + item.message.payload

    async with Mesh(address) as mesh:
        channel = mesh.channel("rpcmesh-bus")
        subscriber = Subscriber(
            channel, SubscriberConfig(topic="mesh.jobs", group="g", start="earliest"), handle
        )  # type: ignore[arg-type]
        responder = Responder(channel, "mesh.ask", echo)  # type: ignore[arg-type]
        await subscriber.start()
        await responder.start()
        try:
            async with Publisher(channel) as publisher:  # type: ignore[arg-type]
                results = await asyncio.gather(*[publisher.publish("mesh.jobs", str(i)) for i in range(20)])
            assert sorted(r.sequence for r in results) == list(range(1, 21))
            await asyncio.wait_for(done.wait(), 20)
            assert sorted(received) == sorted(str(i).encode() for i in range(20))
            reply = await request(channel, "mesh.ask", b"hi", within=5)  # type: ignore[arg-type]
            assert reply.payload == b"re:hi"
        finally:
            await responder.stop()
            await subscriber.stop()
