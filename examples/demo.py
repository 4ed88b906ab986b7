"""`make demo`: the example shop on rpcmesh, end to end, on the embedded default.

Starts the control plane (`rpcmesh up` on SQLite in a temporary folder), the
shop's services as separate processes (two instances of `users`), then tells
the story: an order that completes, one whose payment is declined and is
compensated, events reaching the notification service over the Bus, and an
instance killed with -9 under load that the client rides over. Exits 0 and
leaves no process behind.

The control plane also serves its web console (docs/console.md) on a free HTTP
port: the demo prints its URL first, and it stays reachable while the demo runs.
With ``--keep-open`` (or ``RPCMESH_DEMO_KEEP_OPEN=1``) everything keeps running
after the story until Ctrl-C, to look around in the console.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))

import grpc.aio  # noqa: E402
from rpcmesh.v1 import saga_pb2, saga_pb2_grpc  # noqa: E402
from shop.place_order import place_order_definition, place_order_input  # noqa: E402
from shop.v1 import shop_pb2, shop_pb2_grpc  # noqa: E402

from rpcmesh.client import Mesh, MeshPolicy, MethodPolicy, ServicePolicy  # noqa: E402
from rpcmesh.saga import SETTLED_STATES  # noqa: E402
from rpcmesh.telemetry import TelemetryConfig, get_telemetry, inject_metadata, setup_telemetry  # noqa: E402
from rpcmesh.testing import (  # noqa: E402
    CollectedSpan,
    ManagedProcess,
    OtlpCollector,
    render_trace_tree,
    rpcmesh_command,
    running_collector,
)

TERMINAL = SETTLED_STATES
CONSOLE_PATTERN = re.compile(r"console at (https?://\S+?)/?$")


def say(text: str = "") -> None:
    print(text, flush=True)


def state(value: int) -> str:
    return saga_pb2.SagaState.Name(value).removeprefix("SAGA_STATE_")  # type: ignore[arg-type]


class Shop:
    """The processes of the demo; every one is killed on exit."""

    def __init__(self, data_dir: Path, telemetry_env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.telemetry_env = telemetry_env
        self.processes: list[ManagedProcess] = []
        self.instances: dict[str, ManagedProcess] = {}
        self.address = ""
        self.console_url = ""
        self.traced_order = ""

    def start(self, args: list[str], wait_for: str, service_name: str = "") -> ManagedProcess:
        extra = {"OTEL_SERVICE_NAME": service_name} if service_name else {}
        env = {
            **os.environ,
            **self.telemetry_env,
            **extra,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(EXAMPLES),
        }
        proc = ManagedProcess(args, env=env)
        self.processes.append(proc)
        proc.wait_for_line(wait_for, timeout=30)
        return proc

    def start_control_plane(self) -> None:
        args = rpcmesh_command("up", "--port", "0", "--http-port", "0", "--data-dir", str(self.data_dir))
        proc = self.start(args, "listening on", service_name="control-plane")
        self.address = proc.wait_for_address()
        self.console_url = proc.wait_for_line(CONSOLE_PATTERN, timeout=30).group(1) + "/"

    def start_service(self, name: str, instance_id: str) -> ManagedProcess:
        script = str(EXAMPLES / "shop" / "run_service.py")
        ready = "listening on bus" if name == "notifications" else "listening on"
        proc = self.start(
            [sys.executable, script, name, "--registry", self.address, "--instance-id", instance_id], ready
        )
        self.instances[instance_id] = proc
        return proc

    def close(self) -> None:
        for proc in reversed(self.processes):
            proc.terminate(timeout=5)


@contextmanager
def running_shop(collector: OtlpCollector) -> Iterator[Shop]:
    # Every process exports its spans over OTLP to the demo's own collector.
    telemetry_env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with tempfile.TemporaryDirectory(prefix="rpcmesh-demo-") as tmp:
        shop = Shop(Path(tmp) / "data", telemetry_env)
        try:
            yield shop
        finally:
            shop.close()


async def place_order(
    stub: saga_pb2_grpc.SagaCoordinatorStub, order_id: str, user: str, cents: int, **items: int
) -> saga_pb2.Saga:
    started = await stub.StartSaga(
        saga_pb2.StartSagaRequest(
            definition_name="place-order",
            input=place_order_input(order_id, user, cents, **items),
            idempotency_key=order_id,
        ),
        timeout=10,
        metadata=inject_metadata(()),
    )
    saga_id = started.saga.saga_id
    async for update in stub.WatchSaga(saga_pb2.WatchSagaRequest(saga_id=saga_id), timeout=60):
        transition = update.transition
        if transition.step:
            say(f"    saga {saga_id[:8]}  {transition.kind:<22} {transition.step}")
        if update.saga.state in TERMINAL:
            return update.saga
    raise RuntimeError(f"saga {saga_id} did not finish")


async def story(shop: Shop) -> None:
    policy = MeshPolicy(default=ServicePolicy(method=MethodPolicy(idempotent=True, timeout=5)))
    async with (
        grpc.aio.insecure_channel(shop.address) as control_plane,
        Mesh(shop.address, policy=policy) as mesh,
    ):
        sagas = saga_pb2_grpc.SagaCoordinatorStub(control_plane)
        await sagas.RegisterDefinition(
            saga_pb2.RegisterDefinitionRequest(definition=place_order_definition())
        )
        orders = shop_pb2_grpc.OrdersStub(mesh.channel("orders"))
        inventory = shop_pb2_grpc.InventoryStub(mesh.channel("inventory"))
        users = shop_pb2_grpc.UsersStub(mesh.channel("users"))
        await mesh.wait_for_instances("users", count=2)

        say("\n1. Alice orders two books for 30.00: the saga completes.")
        alice_order = f"order-{uuid.uuid4().hex[:6]}"
        with get_telemetry().tracer.start_as_current_span(f"place order {alice_order}") as span:
            shop.traced_order = format(span.get_span_context().trace_id, "032x")
            saga = await place_order(sagas, alice_order, "u-alice", 3_000, book=2)
        order = (await orders.GetOrder(shop_pb2.GetOrderRequest(order_id=alice_order))).order
        say(f"   -> saga {state(saga.state)}; order {alice_order} is {shop_pb2.OrderState.Name(order.state)}")

        say("\n2. Bob orders a lamp for 120.00, over his card's limit: payment is declined and compensated.")
        stock_before = (await inventory.GetStock(shop_pb2.GetStockRequest(sku="lamp"))).available
        bob_order = f"order-{uuid.uuid4().hex[:6]}"
        saga = await place_order(sagas, bob_order, "u-bob", 12_000, lamp=1)
        order = (await orders.GetOrder(shop_pb2.GetOrderRequest(order_id=bob_order))).order
        stock_after = (await inventory.GetStock(shop_pb2.GetStockRequest(sku="lamp"))).available
        say(f"   -> saga {state(saga.state)} ({saga.error})")
        say(
            f"   -> order {bob_order} is {shop_pb2.OrderState.Name(order.state)}; "
            f"lamps available before {stock_before}, after {stock_after} (stock released)"
        )

        say("\n3. Users runs as two instances; one is killed with -9 while the client calls it.")
        picks_before = {e.instance_id: e.picks for e in mesh.endpoints("users")}
        calls = failures = 0
        started = time.monotonic()
        killed_at = 0.0
        while time.monotonic() - started < 3.0:
            if not killed_at and time.monotonic() - started >= 1.0:
                shop.instances["users-1"].kill()
                killed_at = time.monotonic()
                say("   (users-1 killed with -9)")
                picks_at_kill = {e.instance_id: e.picks for e in mesh.endpoints("users")}
            try:
                await users.GetUser(shop_pb2.GetUserRequest(user_id="u-alice"))
                calls += 1
            except grpc.aio.AioRpcError:
                failures += 1
        say(f"   -> {calls} calls, {failures} failed")
        for view in mesh.endpoints("users"):
            after = view.picks - picks_at_kill.get(view.instance_id, 0)
            before = picks_at_kill.get(view.instance_id, 0) - picks_before.get(view.instance_id, 0)
            breaker = view.breaker.state.value if view.breaker else "-"
            say(f"   -> {view.instance_id}: {before} picks before the kill, {after} after; breaker {breaker}")
        if failures:
            raise SystemExit(f"demo: {failures} calls failed while an instance was killed")


def print_trace(collector: OtlpCollector, trace_id: str) -> None:
    """Wait until every participant's spans of the trace arrived, then print the tree."""
    wanted = {"shop-client", "control-plane", "orders", "inventory", "payments"}

    def complete(spans: list[CollectedSpan]) -> bool:
        return wanted <= {s.service for s in spans if s.trace_id == trace_id}

    try:
        collector.wait_for_spans(complete, timeout=20)
    except AssertionError:
        say("   (not every service's spans arrived in time; the tree shows what did)")
    say(render_trace_tree(list(collector.spans), trace_id))


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM (then the caller's cleanup stops every process)."""
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    signal.sigwait(signals)


def main() -> None:
    parser = argparse.ArgumentParser(description="The example shop on rpcmesh, end to end.")
    parser.add_argument(
        "--keep-open",
        action="store_true",
        default=os.environ.get("RPCMESH_DEMO_KEEP_OPEN") == "1",
        help="after the story, keep everything (and the web console) running until Ctrl-C",
    )
    options = parser.parse_args()
    say("rpcmesh demo: the example shop on the embedded control plane")
    with running_collector() as collector, running_shop(collector) as shop:
        telemetry = setup_telemetry(
            TelemetryConfig.from_env(environ=shop.telemetry_env, service_name="shop-client")
        )
        shop.start_control_plane()
        say(f"control plane listening on {shop.address} (SQLite in a temporary folder)")
        say(f"web console: {shop.console_url}  (open it in a browser while the demo runs)")
        for name, instance in [
            ("users", "users-1"),
            ("users", "users-2"),
            ("orders", "orders-1"),
            ("inventory", "inventory-1"),
            ("payments", "payments-1"),
            ("notifications", "notifications-1"),
        ]:
            shop.start_service(name, instance)
        say("services up: users x2, orders, inventory, payments, notifications")
        asyncio.run(story(shop))
        telemetry.force_flush()
        notifications = [
            line for p in shop.processes for line in p.lines if line.startswith("notifications |")
        ]
        say("\n4. Order events reached the notification service over the Bus:")
        for line in notifications:
            say(f"   {line}")
        say(f"\n5. The trace of Alice's order ({shop.traced_order}), as the OTLP collector received it:")
        print_trace(collector, shop.traced_order)
        telemetry.shutdown()
        if options.keep_open:
            say(f"\nThe shop keeps running: the console is at {shop.console_url} (Ctrl-C stops everything).")
            wait_for_interrupt()
    say("\ndemo finished; every process stopped")


if __name__ == "__main__":
    main()
