"""Run one shop service on a ServiceHost, registered with the Registry.

    python examples/shop/run_service.py orders --registry 127.0.0.1:50051 [--instance-id orders-1]

Services: users, orders, inventory, payments, notifications. Orders publishes
order events on the Bus; notifications subscribes to them. Prints
``listening on HOST:PORT`` once serving and exits cleanly on SIGTERM; a start-up
problem (port in use, bad TLS files) is one line on stderr and exit code 1.

Secure mode comes from the environment (docs/security.md): ``RPCMESH_TLS_CERT``/``_KEY``
(the service's own TLS port), ``RPCMESH_TLS_CLIENT_AUTH`` (require client certificates),
``RPCMESH_TLS_CA``, and the service's identity towards the control plane:
``RPCMESH_TLS_CLIENT_CERT``/``_KEY`` (mTLS) or ``RPCMESH_TOKEN``.
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
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc.aio

from rpcmesh.bus import Received, Subscriber, SubscriberConfig, publish_event
from rpcmesh.host import ServiceHost, ServiceHostConfig, StartupError, host_security_from_env
from rpcmesh.security import ClientSecurity, aio_channel
from rpcmesh.telemetry import TelemetryConfig, setup_telemetry
from shop.servicers import (
    InventoryServicer,
    OrdersServicer,
    PaymentsServicer,
    UsersServicer,
    describe_event,
)
from shop.v1 import shop_pb2_grpc

SERVICES = ("users", "orders", "inventory", "payments", "notifications")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run one shop service.")
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("--registry", required=True, help="control plane host:port (Registry and Bus)")
    parser.add_argument("--instance-id", default="")
    parser.add_argument("--ttl", type=float, default=5.0)
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


async def run_notifications(control_plane: grpc.aio.Channel) -> None:
    """Print a notification for every order event; runs until cancelled."""

    async def notify(received: Received) -> None:
        event_type = received.message.topic.removeprefix("events.")
        print(f"notifications | {describe_event(event_type, received.message.payload)}", flush=True)

    subscriber = Subscriber(
        control_plane,
        SubscriberConfig(topic="events.order.>", group="notifications", start="earliest"),
        notify,
    )
    await subscriber.start()
    print("listening on bus events.order.>", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await subscriber.stop()


async def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    async with aio_channel(args.registry, ClientSecurity.from_env()) as control_plane:
        if args.service == "notifications":
            # A plain process (no ServiceHost): it sets its telemetry up itself.
            telemetry = setup_telemetry(TelemetryConfig.from_env(service_name="notifications"))
            try:
                await run_notifications(control_plane)
            finally:
                telemetry.shutdown()
            return

        async def publish(event_type: str, data: dict[str, object]) -> None:
            await publish_event(
                control_plane,
                event_type,
                json.dumps(data),
                source=args.service,
                content_type="application/json",
            )

        host = ServiceHost(
            ServiceHostConfig(
                service=args.service,
                registry=args.registry,
                instance_id=args.instance_id,
                ttl=args.ttl,
                grace=2.0,
                security=host_security_from_env(),
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
    service = parse_args().service  # exits 2 on bad arguments before anything starts
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main())
    except StartupError as exc:
        print(f"{service}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
