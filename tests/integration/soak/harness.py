"""The rolling-restart soak: run it, then check its invariants.

:func:`run_soak` starts the control plane (one embedded node on SQLite, or two
nodes on PostgreSQL + NATS JetStream), the shop's services, and the traffic;
restarts the nodes on a schedule drawn from ``random.Random(seed)``; lets the
system settle; then checks:

* every shop instance is resolvable, passing, on every node, and no shop process died;
* 0 client-visible failures of idempotent mesh calls; for the non-idempotent ones,
  no more than were in flight at the stops;
* every message the Bus acknowledged reached the consumer group;
* every saga the coordinator acknowledged is terminal; a completed one confirmed its
  order, a compensated one cancelled it, and every step that had completed was
  compensated: the stock reserved equals exactly the completed orders' items (a
  reservation never released, or released and then taken again, shows up there);
* every SIGTERM ended its node within the patience, and the traffic's own loops never failed.

The tests in this package and ``scripts/soak.py`` both call :func:`run_soak`.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import random
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc.aio
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc, saga_pb2
from shop.servicers import INITIAL_STOCK
from shop.v1 import shop_pb2, shop_pb2_grpc

from rpcmesh.saga import SETTLED_STATES
from tests.integration.soak.cluster import SHOP_INSTANCES, Node, Restart, Shop, plan_restarts
from tests.integration.soak.traffic import Traffic

TERMINAL = SETTLED_STATES
COMPENSATED_STEPS = ("create-order", "reserve-stock", "charge-payment")
"""The place-order steps that have a compensation."""
CHECK_PATIENCE_S = 60.0
"""How long the checks wait for the system to converge after the traffic stopped."""


@dataclass(frozen=True, kw_only=True)
class SoakConfig:
    """One soak run."""

    mode: str
    """"embedded" (one node on SQLite) or "scale-out" (two nodes on PostgreSQL + NATS)."""
    seed: int
    restarts: int = 10
    gap: tuple[float, float] = (0.5, 1.5)
    """Seconds of traffic before each stop, drawn uniformly."""
    down: tuple[float, float] = (0.0, 0.5)
    """Seconds a stopped node stays down, drawn uniformly."""
    settle_s: float = 2.0
    """Traffic after the last restart, before it stops and the checks begin."""
    ttl: float = 5.0
    """The shop instances' lease TTL."""
    store: str | None = None
    """PostgreSQL URL (scale-out)."""
    bus: str | None = None
    """NATS URL (scale-out)."""

    def __post_init__(self) -> None:
        if self.mode not in ("embedded", "scale-out"):
            raise ValueError(f"mode: 'embedded' or 'scale-out', got {self.mode!r}")
        if self.mode == "scale-out" and not (self.store and self.bus):
            raise ValueError("scale-out needs store and bus")


@dataclass
class SoakResult:
    """What a run did and which invariants it broke."""

    config: SoakConfig
    schedule: list[Restart]
    figures: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """One JSON-able dict: the run's parameters, figures and violations."""
        return {
            "mode": self.config.mode,
            "seed": self.config.seed,
            "restarts": self.config.restarts,
            "ok": not self.violations,
            **self.figures,
            "violations": self.violations,
            "schedule": [asdict(r) for r in self.schedule],
        }

    def failure_message(self) -> str:
        lines = [
            f"rolling-restart soak failed: mode={self.config.mode} seed={self.config.seed} "
            f"restarts={self.config.restarts} gap={self.config.gap} down={self.config.down}",
            "violations:",
            *(f"  - {v}" for v in self.violations),
            "schedule:",
            *(f"  {r.describe()}" for r in self.schedule),
            f"figures: {self.figures}",
        ]
        return "\n".join(lines)


async def run_soak(config: SoakConfig, workdir: Path | None = None) -> SoakResult:
    """Run the soak ``config`` describes (SQLite files under ``workdir``, by default a temporary one)."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="rpcmesh-soak-") as tmp:
            return await run_soak(config, Path(tmp))
    rng = random.Random(config.seed)
    schedule = plan_restarts(
        rng, mode=config.mode, restarts=config.restarts, gap=config.gap, down=config.down
    )
    result = SoakResult(config, schedule)
    extra: tuple[str, ...] = ()
    names = ["a"]
    if config.mode == "scale-out":
        assert config.store and config.bus
        extra = ("--store", config.store, "--bus", config.bus)
        names = ["a", "b"]
    nodes = {name: Node(name, workdir / name, extra) for name in names}
    prefix = f"soak{uuid.uuid4().hex[:10]}"
    shop: Shop | None = None
    traffic: Traffic | None = None
    began = time.monotonic()
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = []
    previous_handler = loop.get_exception_handler()

    def record_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        task = context.get("task") or context.get("future")
        what = describe_task(task) if isinstance(task, asyncio.Task) else repr(task)[:120]
        loop_errors.append(f"{context.get('message')}: {what}")
        loop.default_exception_handler(context)

    loop.set_exception_handler(record_loop_error)
    try:
        for node in nodes.values():
            await asyncio.to_thread(node.start)
        addresses = [node.address for node in nodes.values()]
        shop = Shop(addresses, config.ttl)
        await asyncio.to_thread(shop.start)
        traffic = Traffic(addresses, prefix, config.seed)
        await traffic.start()
        for restart in schedule:
            await asyncio.sleep(restart.gap_s)
            node = nodes[restart.node]
            restart.at_s = round(traffic.elapsed(), 3)
            restart.in_flight = traffic.tally.in_flight
            stopped = time.monotonic()
            await asyncio.to_thread(node.stop, restart.kind, restart)
            await asyncio.sleep(restart.down_s)
            await asyncio.to_thread(node.start)
            restart.back_s = round(time.monotonic() - stopped, 3)
        await asyncio.sleep(config.settle_s)
        traffic_s = traffic.elapsed()
        await traffic.stop()
        checks_began = time.monotonic()
        await check(result, traffic, shop, addresses)
        result.figures.update(
            traffic_s=round(traffic_s, 1),
            check_s=round(time.monotonic() - checks_began, 1),
            total_s=round(time.monotonic() - began, 1),
        )
    finally:
        if traffic is not None:
            await traffic.close()
            leaked = await leftover_tasks()
            if leaked:
                result.violations.append(f"{len(leaked)} tasks outlived the traffic's close(): {leaked[:5]}")
        # A pending task nothing refers to is garbage: collecting it reports it to the handler above.
        gc.collect()
        await asyncio.sleep(0)
        loop.set_exception_handler(previous_handler)
        if loop_errors:
            kinds = collections.Counter(error.split(" at 0x")[0] for error in loop_errors)
            result.violations.append(f"{len(loop_errors)} asyncio errors (leaked tasks): {dict(kinds)}")
        if shop is not None:
            await asyncio.to_thread(shop.close)
        for node in nodes.values():
            await asyncio.to_thread(node.close)
        if config.bus:
            await purge_topics(config.bus, prefix)
    return result


async def leftover_tasks() -> list[str]:
    """Tasks of this loop still pending once everything was closed (after a moment to finish)."""
    await asyncio.sleep(0.5)
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    return sorted(describe_task(task) for task in pending)


def describe_task(task: asyncio.Task[Any]) -> str:
    """The task's coroutine and, for gRPC's request pump, the request iterator it is stuck on."""
    coroutine = task.get_coro()
    name = getattr(coroutine, "__qualname__", repr(coroutine))
    frame = getattr(coroutine, "cr_frame", None)
    feeding = frame.f_locals.get("request_iterator") if frame is not None else None
    if feeding is not None:
        name += f" <- {getattr(feeding, '__qualname__', type(feeding).__name__)}"
    return name


async def purge_topics(url: str, prefix: str) -> None:
    """Delete the run's own NATS streams (the shared server outlives the run)."""
    from rpcmesh.controlplane.bus.nats_store import NatsBusStore

    store = NatsBusStore(url)
    await store.open()
    try:
        await store.purge_prefix(prefix)
    finally:
        await store.close()


async def eventually(condition: Any, patience: float = CHECK_PATIENCE_S) -> bool:
    """Poll the async ``condition`` until it is true or ``patience`` passed; its last answer."""
    deadline = time.monotonic() + patience
    while True:
        if await condition():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.2)


async def check(result: SoakResult, traffic: Traffic, shop: Shop, addresses: list[str]) -> None:
    """Check every invariant; add a line to ``result.violations`` for each one broken."""
    tally = traffic.tally
    violations = result.violations
    schedule = result.schedule

    # Every SIGTERM ended its node in time.
    hung = [r.describe() for r in schedule if r.hung]
    if hung:
        violations.append(f"SIGTERM did not stop the node: {hung}")
    dead = shop.dead()
    if dead:
        violations.append(f"shop processes died: {dead}")
    if tally.errors:
        violations.append(f"traffic loops failed: {tally.errors[:5]}")

    # Every shop instance resolvable (passing) on every node.
    expected = collections.defaultdict(set)
    for service, instance in SHOP_INSTANCES:
        expected[service].add(instance)
    missing: dict[str, dict[str, set[str]]] = {}

    async def all_resolvable() -> bool:
        missing.clear()
        for address in addresses:
            async with grpc.aio.insecure_channel(address) as channel:
                registry = registry_pb2_grpc.RegistryStub(channel)
                for service, instances in expected.items():
                    try:
                        request = registry_pb2.ResolveRequest(service=service)
                        found = await registry.Resolve(request, timeout=5)
                    except grpc.aio.AioRpcError as exc:
                        missing.setdefault(address, {})[service] = {f"<{exc.code().name}>"}
                        continue
                    passing = {
                        i.instance_id
                        for i in found.instances
                        if i.health == registry_pb2.HEALTH_STATE_PASSING
                    }
                    if instances - passing:
                        missing.setdefault(address, {})[service] = instances - passing
        return not missing

    if not await eventually(all_resolvable, patience=20):
        violations.append(f"instances not resolvable (node -> service -> missing): {missing}")

    # Mesh calls.
    if tally.idempotent_failures:
        violations.append(
            f"{len(tally.idempotent_failures)} idempotent calls failed: {tally.idempotent_failures[:5]}"
        )
    allowed = sum(r.in_flight for r in schedule)
    if len(tally.other_failures) > allowed:
        violations.append(
            f"{len(tally.other_failures)} non-idempotent calls failed, {allowed} were in flight "
            f"at the stops: {tally.other_failures[:5]}"
        )

    # Acknowledged messages reached the consumer group.
    async def all_received() -> bool:
        return tally.acked <= tally.received

    await eventually(all_received)
    lost = sorted(tally.acked - tally.received)
    if lost:
        violations.append(f"{len(lost)} acknowledged messages never reached the group: {lost[:10]}")

    await check_sagas(result, traffic)
    result.figures.update(
        idempotent_ok=tally.idempotent_ok,
        idempotent_failed=len(tally.idempotent_failures),
        non_idempotent_ok=tally.other_ok,
        non_idempotent_failed=len(tally.other_failures),
        non_idempotent_errors=tally.other_failures[:3],
        in_flight_at_stops=allowed,
        published_acked=len(tally.acked),
        publish_attempts=tally.publish_attempts,
        publish_given_up=tally.unacked,
        received_distinct=len(tally.received),
        deliveries=tally.deliveries,
        lost=len(lost),
        sigterm_hangs=len(hung),
        max_stop_s=max((r.stop_s for r in schedule), default=0.0),
        max_back_s=max((r.back_s for r in schedule), default=0.0),
    )
    if not (tally.idempotent_ok and tally.other_ok and tally.acked):
        violations.append("the traffic did not run (no successful call or publish)")


def compensation_reason(saga: saga_pb2.Saga) -> str:
    """The shop's compensation story a saga tells: ``" (declined)"``, ``" (out of stock)"`` or ""."""
    steps = {s.name: s for s in saga.steps}
    states = {name: step_state(s) for name, s in steps.items()}
    if states.get("create-order") != "COMPENSATED":
        return ""
    charge, reserve = steps.get("charge-payment"), steps.get("reserve-stock")
    if states.get("reserve-stock") == "COMPENSATED" and states.get("charge-payment") == "FAILED":
        return " (declined)" if charge is not None and "card declined" in charge.error else ""
    if states.get("reserve-stock") == "FAILED" and reserve is not None and "out of stock" in reserve.error:
        return " (out of stock)"  # long runs use the shop's whole stock up
    return ""


def step_state(step: saga_pb2.StepExecution) -> str:
    return saga_pb2.StepState.Name(step.state).removeprefix("STEP_STATE_")


async def check_sagas(result: SoakResult, traffic: Traffic) -> None:
    """Every acknowledged saga terminal, its effects in the shop matching its outcome."""
    tally = traffic.tally
    violations = result.violations
    if tally.saga_start_failures:
        violations.append(f"StartSaga never acknowledged: {tally.saga_start_failures[:5]}")
    records = [r for r in tally.sagas.values() if r.saga_id]
    sagas: dict[str, saga_pb2.Saga] = {}

    async def all_terminal() -> bool:
        for record in records:
            if record.order_id not in sagas or sagas[record.order_id].state not in TERMINAL:
                sagas[record.order_id] = await traffic.saga(record.saga_id)
                if sagas[record.order_id].state not in TERMINAL:
                    return False
        return True

    if not await eventually(all_terminal):
        stuck = [
            f"{r.order_id}/{r.saga_id}: {saga_pb2.SagaState.Name(sagas[r.order_id].state)}"
            for r in records
            if r.order_id in sagas and sagas[r.order_id].state not in TERMINAL
        ]
        violations.append(f"{len(stuck)} sagas not terminal: {stuck[:5]}")
        return

    orders = shop_pb2_grpc.OrdersStub(traffic.mesh.channel("orders"))
    inventory = shop_pb2_grpc.InventoryStub(traffic.mesh.channel("inventory"))
    reserved: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    wrong: list[str] = []
    compensation_attempts = 0
    for record in records:
        saga = sagas[record.order_id]
        state = saga_pb2.SagaState.Name(saga.state).removeprefix("SAGA_STATE_")
        reason = compensation_reason(saga) if saga.state == saga_pb2.SAGA_STATE_COMPENSATED else ""
        outcomes[("declined " if record.declined else "accepted ") + state + reason] += 1
        step_states = {s.name: step_state(s) for s in saga.steps}
        compensation_attempts = max([compensation_attempts, *(s.compensation_attempts for s in saga.steps)])
        order = (await orders.GetOrder(shop_pb2.GetOrderRequest(order_id=record.order_id), timeout=10)).order
        where = f"{record.order_id} (saga {record.saga_id}, {state}, steps {step_states})"
        if saga.state == saga_pb2.SAGA_STATE_COMPLETED:
            reserved[record.sku] += 1
            if record.declined:
                wrong.append(f"{where}: a declined payment completed")
            if any(s != "SUCCEEDED" for s in step_states.values()):
                wrong.append(f"{where}: completed with a step not succeeded")
            if order.state != shop_pb2.ORDER_STATE_CONFIRMED:
                wrong.append(f"{where}: order is {shop_pb2.OrderState.Name(order.state)}")
        elif saga.state == saga_pb2.SAGA_STATE_COMPENSATED:
            undone = [n for n in COMPENSATED_STEPS if step_states.get(n) in ("SUCCEEDED", "COMPENSATING")]
            if undone or "COMPENSATION_FAILED" in step_states.values():
                wrong.append(f"{where}: a completed step was not compensated")
            if record.declined and not reason:
                wrong.append(f"{where}: neither the declined-payment nor the out-of-stock compensation")
            if order.state != shop_pb2.ORDER_STATE_CANCELLED:
                wrong.append(f"{where}: order is {shop_pb2.OrderState.Name(order.state)}")
        else:
            wrong.append(f"{where}: ended {state}")
    if wrong:
        violations.append(f"{len(wrong)} sagas with wrong effects: {wrong[:5]}")

    # Each completed reservation is undone exactly once: what stays reserved is exactly the completed orders'.
    stock_wrong = []
    for sku in ("book", "lamp"):
        stock = await inventory.GetStock(shop_pb2.GetStockRequest(sku=sku), timeout=10)
        want = reserved[sku]
        if stock.reserved != want or stock.available != INITIAL_STOCK[sku] - want:
            stock_wrong.append(
                f"{sku}: reserved {stock.reserved}, available {stock.available}; "
                f"completed orders hold {want} of {INITIAL_STOCK[sku]}"
            )
    if stock_wrong:
        violations.append(f"stock does not match the completed sagas: {stock_wrong}")
    completed = outcomes["accepted COMPLETED"]
    compensated = outcomes["declined COMPENSATED (declined)"]
    if not (completed and compensated):
        violations.append(f"sagas did not both complete and compensate: {dict(outcomes)}")
    result.figures.update(
        sagas=len(records),
        saga_outcomes=dict(outcomes),
        max_compensation_attempts=compensation_attempts,
    )
