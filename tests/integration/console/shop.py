"""The example shop on a real control plane with its HTTP port, for the console's browser tests.

`rpcmesh up --port 0 --http-port 0` on SQLite in a temporary folder, the shop's services as
separate processes (two `users` instances), the place-order saga definition registered, and
Chromium started the way this machine allows (Debian's binary, headless, no sandbox).
Used by tests/integration/console and by scripts/console_screenshots.py.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from google.protobuf import duration_pb2
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc, registry_pb2, registry_pb2_grpc, saga_pb2, saga_pb2_grpc
from shop.place_order import place_order_definition, place_order_input

from tests.support.processes import ROOT, ManagedProcess, python_env, rpcmesh_command

CHROMIUM = os.environ.get("RPCMESH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HTTP_PATTERN = re.compile(r"console at (https?://\S+?)/?$")
SHOP_INSTANCES = [
    ("users", "users-1"),
    ("users", "users-2"),
    ("orders", "orders-1"),
    ("inventory", "inventory-1"),
    ("payments", "payments-1"),
    ("notifications", "notifications-1"),
]


def chromium_missing() -> str | None:
    """Why no browser test can run here, or None when Chromium and Playwright are installed."""
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    return None


class Shop:
    """The control plane and the shop's processes; :meth:`close` stops every one."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.processes: list[ManagedProcess] = []
        self.instances: dict[str, ManagedProcess] = {}
        self.address = ""
        self.url = ""
        self._channel: grpc.Channel | None = None

    def start(self) -> None:
        plane = ManagedProcess(
            rpcmesh_command("up", "--port", "0", "--http-port", "0", "--data-dir", str(self.data_dir))
        )
        self.processes.append(plane)
        self.address = plane.wait_for_address(timeout=60)
        self.url = plane.wait_for_line(HTTP_PATTERN, timeout=60).group(1)
        script = str(ROOT / "examples" / "shop" / "run_service.py")
        started = []
        for name, instance_id in SHOP_INSTANCES:
            proc = ManagedProcess(
                [sys.executable, script, name, "--registry", self.address, "--instance-id", instance_id],
                env=python_env(),
            )
            self.processes.append(proc)
            self.instances[instance_id] = proc
            started.append((name, proc))
        for name, proc in started:
            proc.wait_for_line("listening on bus" if name == "notifications" else "listening on", timeout=60)
        self.sagas.RegisterDefinition(
            saga_pb2.RegisterDefinitionRequest(definition=place_order_definition()), timeout=30
        )

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    @property
    def sagas(self) -> saga_pb2_grpc.SagaCoordinatorStub:
        return saga_pb2_grpc.SagaCoordinatorStub(self.channel)

    @property
    def bus(self) -> bus_pb2_grpc.BusStub:
        return bus_pb2_grpc.BusStub(self.channel)

    @property
    def registry(self) -> registry_pb2_grpc.RegistryStub:
        return registry_pb2_grpc.RegistryStub(self.channel)

    def place_order(self, order_id: str, user: str, cents: int, **items: int) -> saga_pb2.Saga:
        """Start the place-order saga and wait (up to 60 s) until it has settled."""
        started = self.sagas.StartSaga(
            saga_pb2.StartSagaRequest(
                definition_name="place-order",
                input=place_order_input(order_id, user, cents, **items),
                idempotency_key=order_id,
                wait=duration_pb2.Duration(seconds=60),
            ),
            timeout=90,
        )
        return started.saga

    def start_order(self, order_id: str, user: str, cents: int, **items: int) -> str:
        """Start the place-order saga without waiting; returns its id."""
        started = self.sagas.StartSaga(
            saga_pb2.StartSagaRequest(
                definition_name="place-order",
                input=place_order_input(order_id, user, cents, **items),
                idempotency_key=order_id,
            ),
            timeout=30,
        )
        return started.saga.saga_id

    def start_inline(self, name: str, steps: list[saga_pb2.SagaStep], user: str, cents: int) -> str:
        """Start a saga of an inline definition (place-order's input) without waiting; returns its id."""
        order = f"order-{uuid.uuid4().hex[:6]}"
        started = self.sagas.StartSaga(
            saga_pb2.StartSagaRequest(
                definition=saga_pb2.SagaDefinition(name=name, steps=steps),
                input=place_order_input(order, user, cents, book=1),
                idempotency_key=order,
            ),
            timeout=30,
        )
        return started.saga.saga_id

    def start_stuck_saga(self, name: str) -> str:
        """Start a saga that stays RUNNING until aborted; returns its id.

        create-order, then a step on a service with no instance, whose unsent attempts are retried.
        """
        return self.start_inline(
            name,
            [
                inline_step(
                    "create-order", "orders", "/shop.v1.Orders/CreateOrder", "/shop.v1.Orders/CancelOrder"
                ),
                inline_step("call-ghost", "ghost", "/ghost.v1.Ghost/Call"),
            ],
            "u-alice",
            1_000,
        )

    def start_parked_saga(self, name: str) -> str:
        """Start a saga that stays RUNNING, idle, until aborted; returns its id.

        Its one step is on a service with no instance and retries its unsent attempt only after
        two minutes, so many such sagas cost the control plane next to nothing; aborting one ends
        it at once (nothing to compensate).
        """
        wait = duration_pb2.Duration(seconds=120)
        started = self.sagas.StartSaga(
            saga_pb2.StartSagaRequest(
                definition=saga_pb2.SagaDefinition(
                    name=name,
                    steps=[
                        saga_pb2.SagaStep(
                            name="call-ghost",
                            service="ghost",
                            method="/ghost.v1.Ghost/Call",
                            no_compensation=True,
                            request=saga_pb2.PayloadTemplate(base_from="input"),
                            timeout=duration_pb2.Duration(seconds=5),
                            retry=saga_pb2.RetryPolicy(initial_backoff=wait, max_backoff=wait),
                        )
                    ],
                ),
                idempotency_key=uuid.uuid4().hex,
            ),
            timeout=30,
        )
        return started.saga.saga_id

    def start_failing_compensation(self, name: str) -> str:
        """Start a saga that ends FAILED_COMPENSATION; returns its id.

        create-order, then charge-payment is declined (120.00 is over u-bob's card limit), and
        create-order's compensation calls a method that does not exist (one attempt).
        """
        return self.start_inline(
            name,
            [
                inline_step(
                    "create-order",
                    "orders",
                    "/shop.v1.Orders/CreateOrder",
                    "/shop.v1.Orders/NoSuchMethod",
                    max_attempts=1,
                ),
                inline_step(
                    "charge-payment", "payments", "/shop.v1.Payments/Charge", "/shop.v1.Payments/Refund"
                ),
            ],
            "u-bob",
            12_000,
        )

    def restart_plane(self, *, kill: bool, down: float = 0.0) -> None:
        """Stop the control plane (kill -9 or SIGTERM) and start it again ``down`` seconds later.

        The same gRPC and HTTP ports and data folder; returns once it serves both.
        """
        plane = self.processes[0]
        if kill:
            plane.kill()
        else:
            plane.terminate(timeout=15)
        time.sleep(down)
        port = self.address.rsplit(":", 1)[1]
        http_port = str(urlsplit(self.url).port)
        again = ManagedProcess(
            rpcmesh_command("up", "--port", port, "--http-port", http_port, "--data-dir", str(self.data_dir))
        )
        self.processes[0] = again
        again.wait_for_address(timeout=60)
        again.wait_for_line(HTTP_PATTERN, timeout=60)

    def register_instance(self, service: str, **fields: Any) -> registry_pb2.RegisterResponse:
        """Register an extra instance (no process behind it) with a 1-minute lease."""
        return self.registry.Register(
            registry_pb2.RegisterRequest(
                instance=registry_pb2.Instance(service=service, **fields),
                ttl=duration_pb2.Duration(seconds=60),
            ),
            timeout=30,
        )

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        for proc in reversed(self.processes):
            proc.terminate(timeout=5)


def inline_step(
    name: str, service: str, method: str, compensation: str = "", **retry: Any
) -> saga_pb2.SagaStep:
    """One step of an inline saga definition: 5 s timeout, 3 attempts 1 s apart.

    ``retry``: the compensation's retry policy (RetryPolicy fields), default the definition's.
    """
    return saga_pb2.SagaStep(
        name=name,
        service=service,
        method=method,
        compensation_method=compensation,
        no_compensation=not compensation,
        request=saga_pb2.PayloadTemplate(base_from="input"),
        timeout=duration_pb2.Duration(seconds=5),
        retry=saga_pb2.RetryPolicy(
            max_attempts=3,
            initial_backoff=duration_pb2.Duration(seconds=1),
            max_backoff=duration_pb2.Duration(seconds=1),
        ),
        compensation_retry=saga_pb2.RetryPolicy(**retry) if retry else None,
    )


@contextmanager
def running_shop(data_dir: Path) -> Iterator[Shop]:
    """A started :class:`Shop`, stopped on exit whatever happens."""
    shop = Shop(data_dir)
    try:
        shop.start()
        yield shop
    finally:
        shop.close()


class GroupConsumer:
    """A raw Bus.Subscribe stream in one consumer group: the test decides to ack or nak each delivery."""

    def __init__(self, bus: bus_pb2_grpc.BusStub, topic: str, group: str, max_deliveries: int = 1) -> None:
        self._requests: queue.Queue[bus_pb2.SubscribeRequest | None] = queue.Queue()
        self.deliveries: queue.Queue[bus_pb2.Delivery] = queue.Queue()
        self._requests.put(
            bus_pb2.SubscribeRequest(
                open=bus_pb2.SubscriptionOptions(
                    topic=topic,
                    group=group,
                    mode=bus_pb2.DELIVERY_MODE_GROUP,
                    start=bus_pb2.StartPosition(earliest=True),
                    max_deliveries=max_deliveries,
                )
            )
        )
        self._call = bus.Subscribe(self._outgoing(), timeout=300)
        self.opened = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self.opened.wait(30):
            raise TimeoutError(f"the subscription to {topic} ({group}) did not open")

    def _outgoing(self) -> Iterator[bus_pb2.SubscribeRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for response in self._call:
                if response.opened:
                    self.opened.set()
                for delivery in response.deliveries:
                    self.deliveries.put(delivery)
        except grpc.RpcError:
            pass

    def next(self, timeout: float = 30) -> bus_pb2.Delivery:
        return self.deliveries.get(timeout=timeout)

    def ack(self, delivery: bus_pb2.Delivery) -> None:
        ref = bus_pb2.MessageRef(topic=delivery.message.topic, sequence=delivery.message.sequence)
        self._requests.put(bus_pb2.SubscribeRequest(ack=bus_pb2.Ack(refs=[ref])))

    def nak(self, delivery: bus_pb2.Delivery, error: str) -> None:
        ref = bus_pb2.MessageRef(topic=delivery.message.topic, sequence=delivery.message.sequence)
        self._requests.put(bus_pb2.SubscribeRequest(nak=bus_pb2.Nak(refs=[ref], error=error)))

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._reader.join(timeout=10)


def publish_json(bus: bus_pb2_grpc.BusStub, topic: str, body: object) -> int:
    """Publish one JSON message; returns its sequence."""
    response = bus.Publish(
        bus_pb2.PublishRequest(
            topic=topic,
            messages=[bus_pb2.BusMessage(payload=json.dumps(body).encode(), content_type="application/json")],
        ),
        timeout=30,
    )
    return response.results[0].sequence
