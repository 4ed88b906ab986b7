"""One example-shop service for the soak, registered with every control-plane node it is given.

    python tests/integration/soak/shop_service.py orders --registry A [--registry B] --instance-id orders-1

The servicers are the shop's own (``examples/shop/servicers.py``); what differs from
``examples/shop/run_service.py`` is that this process knows every node of a scale-out
control plane (the lease keeper fails over between them) and that orders publishes its
events through a channel balanced over all nodes, retrying while the nodes restart, so
a restart does not turn into a failed saga step. Prints ``listening on HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    root = Path(__file__).resolve().parents[3]
    sys.path[:0] = [str(root), str(root / "examples")]

import grpc.aio
from shop.servicers import InventoryServicer, OrdersServicer, PaymentsServicer, UsersServicer
from shop.v1 import shop_pb2_grpc

from rpcmesh.bus import publish_event
from rpcmesh.errors import DeadlineExceededError, UnavailableError
from rpcmesh.host import ServiceHost, ServiceHostConfig

SERVICES = ("users", "orders", "inventory", "payments")
PUBLISH_PATIENCE_S = 8.0
"""How long orders keeps retrying an event publish while the control plane restarts."""


def control_plane_target(addresses: list[str]) -> str:
    """One gRPC target over every node (``ipv4:a:1,b:2``), balanced round robin."""
    if len(addresses) == 1:
        return addresses[0]
    return "ipv4:" + ",".join(addresses)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("--registry", action="append", required=True)
    parser.add_argument("--instance-id", required=True)
    parser.add_argument("--ttl", type=float, default=5.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    options = [
        ("grpc.lb_policy_name", "round_robin"),
        # Reconnect within 2 s of a node coming back (gRPC's default backoff grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    async with grpc.aio.insecure_channel(control_plane_target(args.registry), options=options) as plane:

        async def publish(event_type: str, data: dict[str, object]) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + PUBLISH_PATIENCE_S
            while True:
                try:
                    await publish_event(
                        plane,
                        event_type,
                        json.dumps(data),
                        source=args.service,
                        content_type="application/json",
                        id=f"{data['order_id']}-{event_type}",
                    )
                    return
                except (UnavailableError, DeadlineExceededError):
                    if loop.time() >= deadline:
                        raise
                    await asyncio.sleep(0.2)

        host = ServiceHost(
            ServiceHostConfig(
                service=args.service,
                registry=args.registry,
                instance_id=args.instance_id,
                ttl=args.ttl,
                grace=1.0,
            )
        )
        if args.service == "users":
            host.add_servicer(shop_pb2_grpc.add_UsersServicer_to_server, UsersServicer())
        elif args.service == "orders":
            host.add_servicer(shop_pb2_grpc.add_OrdersServicer_to_server, OrdersServicer(publish))
        elif args.service == "inventory":
            host.add_servicer(shop_pb2_grpc.add_InventoryServicer_to_server, InventoryServicer())
        else:
            host.add_servicer(shop_pb2_grpc.add_PaymentsServicer_to_server, PaymentsServicer())
        await host.run()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
