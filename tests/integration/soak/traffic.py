"""The soak's steady traffic: mesh calls, Bus publishes into a consumer group, and order sagas.

Everything the invariants need is recorded here: every client-visible failure of
a mesh call (idempotent ones have a retry policy, the others none), the id of
every message the Bus acknowledged and of every message the consumer group got,
and the order id and saga id of every saga the coordinator acknowledged.
Control-plane calls (StartSaga, Publish) are retried on the next node while a
node restarts: that is what a client of a restarting control plane does.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import grpc
import grpc.aio
from rpcmesh.v1 import saga_pb2, saga_pb2_grpc
from shop.place_order import place_order_definition, place_order_input
from shop.v1 import shop_pb2, shop_pb2_grpc

from rpcmesh.bus import Publisher, Received, Subscriber, SubscriberConfig
from rpcmesh.client import Mesh, MeshPolicy, MethodPolicy, RetryPolicy, ServicePolicy
from rpcmesh.errors import RpcMeshError
from rpcmesh.tasks import start_supervised, stop_tasks

T = TypeVar("T")

CONTROL_PLANE_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
"""What a restarting node answers: try the next node (or the same one again) a little later."""
PATIENCE_S = 30.0
"""How long a control-plane call may keep failing over before it counts as failed."""
CONTROL_PLANE_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
"""gRPC's default reconnect backoff grows to 120 s: after a few restarts a plain channel kept
failing fast ("connection refused", cached) for 30 s and more while the node was long back."""
DECLINED_SHARE = 0.35
"""Share of sagas whose payment is declined (Bob over his card limit): they compensate."""


def mesh_policy() -> MeshPolicy:
    """Users and inventory reads are idempotent and retried; orders' CreateOrder is not idempotent."""
    idempotent = ServicePolicy(
        method=MethodPolicy(
            idempotent=True,
            timeout=10.0,
            retry=RetryPolicy(max_attempts=5, initial_backoff=0.05, max_backoff=0.5),
        )
    )
    return MeshPolicy(
        services={
            "users": idempotent,
            "inventory": idempotent,
            "orders": ServicePolicy(method=MethodPolicy(idempotent=False, timeout=10.0)),
        }
    )


@dataclass
class SagaRecord:
    """One order placed through the saga."""

    order_id: str
    declined: bool
    sku: str
    saga_id: str = ""


@dataclass
class Tally:
    """What the traffic saw."""

    idempotent_ok: int = 0
    idempotent_failures: list[str] = field(default_factory=list)
    other_ok: int = 0
    other_failures: list[str] = field(default_factory=list)
    in_flight: int = 0
    """Non-idempotent calls in flight right now."""
    publish_attempts: int = 0
    acked: set[str] = field(default_factory=set)
    unacked: int = 0
    """Publishes given up after PATIENCE_S (never acknowledged: allowed to be lost)."""
    received: set[str] = field(default_factory=set)
    deliveries: int = 0
    sagas: dict[str, SagaRecord] = field(default_factory=dict)
    saga_start_failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """Unexpected exceptions in the traffic's own loops."""


class Traffic:
    """Drives the shop against ``addresses`` (every control-plane node) until stopped."""

    def __init__(self, addresses: list[str], prefix: str, seed: int) -> None:
        self.addresses = addresses
        self.prefix = prefix
        self.topic = f"{prefix}.soak.events"
        self.seed = seed
        self.tally = Tally()
        self.started_at = 0.0
        self._stop = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._subscribers: list[asyncio.Task[None]] = []
        self._channels = [
            grpc.aio.insecure_channel(address, options=CONTROL_PLANE_CHANNEL_OPTIONS) for address in addresses
        ]
        self._sagas = [saga_pb2_grpc.SagaCoordinatorStub(channel) for channel in self._channels]
        self._publishers = [Publisher(channel) for channel in self._channels]
        self.mesh = Mesh(addresses, policy=mesh_policy())
        self._numbers = itertools.count(1)
        """Order and message numbers, unique across restarts of a loop."""
        self._saga_rng = random.Random(f"{seed}-sagas")

    def elapsed(self) -> float:
        return asyncio.get_running_loop().time() - self.started_at

    async def on_any_node(self, call: Callable[[int], Awaitable[T]], first: int = 0) -> T:
        """``call(node)`` on ``first``, then the next nodes in turn while they are restarting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PATIENCE_S
        attempt = 0
        while True:
            node = (first + attempt) % len(self.addresses)
            try:
                return await call(node)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in CONTROL_PLANE_RETRYABLE or loop.time() >= deadline:
                    raise
            attempt += 1
            await asyncio.sleep(0.1)

    async def start(self) -> None:
        """Register the saga, wait for the shop, open the consumer group and start every loop."""
        self.started_at = asyncio.get_running_loop().time()
        definition = saga_pb2.RegisterDefinitionRequest(definition=place_order_definition())
        await self.on_any_node(lambda i: self._sagas[i].RegisterDefinition(definition, timeout=5))
        await self.mesh.wait_for_instances("users", count=2, within=30)
        for service in ("orders", "inventory", "payments"):
            await self.mesh.wait_for_instances(service, within=30)
        # One group member per node (two on the one node in embedded mode).
        for index in range(max(2, len(self.addresses))):
            channel = self._channels[index % len(self._channels)]
            member = self._supervise(f"subscriber-{index}", partial(self._subscribe, channel))
            self._subscribers.append(member)
        self._loops = [
            self._supervise("idempotent-0", partial(self._idempotent_loop, 0)),
            self._supervise("idempotent-1", partial(self._idempotent_loop, 1)),
            self._supervise("non-idempotent", self._other_loop),
            self._supervise("publish", self._publish_loop),
            self._supervise("sagas", self._saga_loop),
        ]

    async def stop(self) -> None:
        """Let every loop finish the operation it is in, then end the loops (the subscribers keep running)."""
        self._stop.set()
        await asyncio.wait(self._loops, timeout=PATIENCE_S + 10)
        await stop_tasks(self._loops)

    async def close(self) -> None:
        self._stop.set()
        await stop_tasks([*self._loops, *self._subscribers])
        for publisher in self._publishers:
            await publisher.close()
        await self.mesh.close()
        for channel in self._channels:
            await channel.close()

    def _supervise(self, name: str, factory: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        async def run() -> None:
            try:
                await factory()
            except Exception as exc:
                # Recorded so the soak fails on it; the supervisor restarts the loop meanwhile.
                self.tally.errors.append(f"{name} at {self.elapsed():.2f}s: {exc!r}")
                raise

        return start_supervised(run, name=f"soak-{name}")

    async def _idempotent_loop(self, which: int) -> None:
        users = shop_pb2_grpc.UsersStub(self.mesh.channel("users"))
        inventory = shop_pb2_grpc.InventoryStub(self.mesh.channel("inventory"))
        tally = self.tally
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                if (n + which) % 2:
                    await users.GetUser(shop_pb2.GetUserRequest(user_id="u-alice"))
                else:
                    await inventory.GetStock(shop_pb2.GetStockRequest(sku="book"))
                tally.idempotent_ok += 1
            except (grpc.aio.AioRpcError, RpcMeshError) as exc:
                tally.idempotent_failures.append(f"{self.elapsed():.2f}s: {exc!r}"[:300])
            await asyncio.sleep(0.02)

    async def _other_loop(self) -> None:
        orders = shop_pb2_grpc.OrdersStub(self.mesh.channel("orders"))
        tally = self.tally
        while not self._stop.is_set():
            n = next(self._numbers)
            request = shop_pb2.CreateOrderRequest(
                order_id=f"{self.prefix}-direct-{n}",
                user_id="u-alice",
                amount_cents=100,
                items=[shop_pb2.LineItem(sku="chair", quantity=1)],
            )
            tally.in_flight += 1
            try:
                await orders.CreateOrder(request)
                tally.other_ok += 1
            except (grpc.aio.AioRpcError, RpcMeshError) as exc:
                tally.other_failures.append(f"{self.elapsed():.2f}s: {exc!r}"[:300])
            finally:
                tally.in_flight -= 1
            await asyncio.sleep(0.05)

    async def _publish_one(self, message_id: str, first: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PATIENCE_S
        attempt = 0
        while True:
            publisher = self._publishers[(first + attempt) % len(self._publishers)]
            self.tally.publish_attempts += 1
            try:
                await asyncio.wait_for(publisher.publish(self.topic, message_id, id=message_id), 10)
                self.tally.acked.add(message_id)
                return
            except (RpcMeshError, grpc.aio.AioRpcError, TimeoutError):
                if loop.time() >= deadline:
                    self.tally.unacked += 1
                    return
            attempt += 1
            await asyncio.sleep(0.1)

    async def _publish_loop(self) -> None:
        while not self._stop.is_set():
            burst = [f"{self.prefix}-m{next(self._numbers)}" for _ in range(4)]
            await asyncio.gather(*(self._publish_one(m, i) for i, m in enumerate(burst)))
            await asyncio.sleep(0.05)

    async def _subscribe(self, channel: grpc.aio.Channel) -> None:
        async def record(received: Received) -> None:
            self.tally.received.add(received.message.id)
            self.tally.deliveries += 1

        config = SubscriberConfig(
            topic=self.topic, group="soak", start="earliest", ack_deadline=5.0, redelivery_backoff=0.2
        )
        await Subscriber(channel, config, record).run()

    async def _saga_loop(self) -> None:
        rng = self._saga_rng
        while not self._stop.is_set():
            n = next(self._numbers)
            declined = rng.random() < DECLINED_SHARE
            record = SagaRecord(f"{self.prefix}-o{n}", declined, rng.choice(["book", "lamp"]))
            self.tally.sagas[record.order_id] = record
            user, cents = ("u-bob", 12_000) if declined else ("u-alice", 2_500)
            request = saga_pb2.StartSagaRequest(
                definition_name="place-order",
                input=place_order_input(record.order_id, user, cents, **{record.sku: 1}),
                idempotency_key=record.order_id,
            )
            try:
                started = await self.on_any_node(partial(self._start_saga, request), n)
                record.saga_id = started.saga.saga_id
            except grpc.aio.AioRpcError as exc:
                self.tally.saga_start_failures.append(f"{record.order_id}: {exc.code().name} {exc.details()}")
            await asyncio.sleep(0.15)

    async def _start_saga(self, request: saga_pb2.StartSagaRequest, node: int) -> saga_pb2.StartSagaResponse:
        return await self._sagas[node].StartSaga(request, timeout=5)

    async def saga(self, saga_id: str) -> saga_pb2.Saga:
        """The saga as a node sees it now (failing over between nodes)."""
        request = saga_pb2.GetSagaRequest(saga_id=saga_id)
        return (await self.on_any_node(lambda i: self._sagas[i].GetSaga(request, timeout=5))).saga
