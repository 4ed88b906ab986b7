"""The shop's services: every operation is idempotent on its business key (the order id).

A saga step may be invoked again after a coordinator crash, and compensations
are retried: CreateOrder, ReserveStock and Charge return the earlier result
for an order they have seen, and CancelOrder, ReleaseStock and Refund succeed
(doing nothing) for an order they never saw or already undid.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio

from rpcmesh.errors import FailedPreconditionError, NotFoundError, invalid_argument
from shop.v1 import shop_pb2, shop_pb2_grpc

logger = logging.getLogger("shop")

EventSink = Callable[[str, dict[str, object]], Awaitable[None]]

USERS = {
    "u-alice": shop_pb2.User(user_id="u-alice", name="Alice", email="alice@example.com"),
    "u-bob": shop_pb2.User(user_id="u-bob", name="Bob", email="bob@example.com"),
}
# What each customer's card accepts, in cents.
CARD_LIMITS = {"u-alice": 100_000, "u-bob": 5_000}
INITIAL_STOCK = {"book": 1_000, "lamp": 500, "chair": 200}


async def _no_events(event_type: str, data: dict[str, object]) -> None:
    return None


class UsersServicer(shop_pb2_grpc.UsersServicer):
    """Looks customers up."""

    async def GetUser(
        self, request: shop_pb2.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> shop_pb2.GetUserResponse:
        user = USERS.get(request.user_id)
        if user is None:
            raise NotFoundError(f"user {request.user_id!r} not found")
        return shop_pb2.GetUserResponse(user=user)


class OrdersServicer(shop_pb2_grpc.OrdersServicer):
    """Keeps orders; publishes order.created / order.confirmed / order.cancelled events."""

    def __init__(self, publish: EventSink = _no_events) -> None:
        self.orders: dict[str, shop_pb2.Order] = {}
        self._publish = publish

    async def CreateOrder(
        self, request: shop_pb2.CreateOrderRequest, context: grpc.aio.ServicerContext
    ) -> shop_pb2.CreateOrderResponse:
        if not request.order_id:
            raise invalid_argument("order_id", "must not be empty")
        if request.user_id not in USERS:
            raise invalid_argument("user_id", f"unknown user {request.user_id!r}")
        order = self.orders.get(request.order_id)
        if order is None:
            order = shop_pb2.Order(
                order_id=request.order_id,
                user_id=request.user_id,
                items=request.items,
                amount_cents=request.amount_cents,
                state=shop_pb2.ORDER_STATE_PENDING,
            )
            self.orders[request.order_id] = order
            await self._publish("order.created", {"order_id": order.order_id, "user_id": order.user_id})
        return shop_pb2.CreateOrderResponse(order=order)

    async def ConfirmOrder(
        self, request: shop_pb2.ConfirmOrderRequest, context: grpc.aio.ServicerContext
    ) -> shop_pb2.ConfirmOrderResponse:
        order = self.orders.get(request.order_id)
        if order is None:
            raise NotFoundError(f"order {request.order_id!r} not found")
        if order.state == shop_pb2.ORDER_STATE_CANCELLED:
            raise FailedPreconditionError(f"order {request.order_id!r} is cancelled")
        if order.state != shop_pb2.ORDER_STATE_CONFIRMED:
            order.state = shop_pb2.ORDER_STATE_CONFIRMED
            await self._publish("order.confirmed", {"order_id": order.order_id, "user_id": order.user_id})
        return shop_pb2.ConfirmOrderResponse(order=order)

    async def CancelOrder(
        self, request: shop_pb2.CancelOrderRequest, context: grpc.aio.ServicerContext
    ) -> shop_pb2.CancelOrderResponse:
        order = self.orders.get(request.order_id)
        if order is not None and order.state != shop_pb2.ORDER_STATE_CANCELLED:
            order.state = shop_pb2.ORDER_STATE_CANCELLED
            await self._publish("order.cancelled", {"order_id": order.order_id, "user_id": order.user_id})
        return shop_pb2.CancelOrderResponse(order=order)

    async def GetOrder(
        self, request: shop_pb2.GetOrderRequest, context: grpc.aio.ServicerContext
    ) -> shop_pb2.GetOrderResponse:
        order = self.orders.get(request.order_id)
        if order is None:
            raise NotFoundError(f"order {request.order_id!r} not found")
        return shop_pb2.GetOrderResponse(order=order)


class InventoryServicer(shop_pb2_grpc.InventoryServicer):
    """Reserves and releases stock per order."""

    def __init__(self) -> None:
        self.available = dict(INITIAL_STOCK)
        self.reservations: dict[str, list[shop_pb2.LineItem]] = {}

    async def ReserveStock(
        self, request: shop_pb2.ReserveStockRequest, context: grpc.aio.ServicerContext
    ) -> shop_pb2.ReserveStockResponse:
        if request.order_id not in self.reservations:
            for item in request.items:
                if self.available.get(item.sku, 0) < item.quantity:
                    raise FailedPreconditionError(f"out of stock: {item.sku}")
            for item in request.items:
                self.available[item.sku] -= item.quantity
            self.reservations[request.order_id] = list(request.items)
        return shop_pb2.ReserveStockResponse(reservation_id=f"r-{request.order_id}")

    async def ReleaseStock(
        self, request: shop_pb2.ReleaseStockRequest, context: grpc.aio.ServicerContext
    ) -> shop_pb2.ReleaseStockResponse:
        items = self.reservations.pop(request.order_id, None)
        for item in items or []:
            self.available[item.sku] += item.quantity
        return shop_pb2.ReleaseStockResponse(released=items is not None)

    async def GetStock(
        self, request: shop_pb2.GetStockRequest, context: grpc.aio.ServicerContext
    ) -> shop_pb2.GetStockResponse:
        reserved = sum(
            i.quantity for items in self.reservations.values() for i in items if i.sku == request.sku
        )
        return shop_pb2.GetStockResponse(
            sku=request.sku, available=self.available.get(request.sku, 0), reserved=reserved
        )


class PaymentsServicer(shop_pb2_grpc.PaymentsServicer):
    """Charges cards; declines amounts over the customer's limit."""

    def __init__(self) -> None:
        self.charges: dict[str, int] = {}

    async def Charge(
        self, request: shop_pb2.ChargeRequest, context: grpc.aio.ServicerContext
    ) -> shop_pb2.ChargeResponse:
        if request.order_id not in self.charges:
            if request.amount_cents > CARD_LIMITS.get(request.user_id, 0):
                raise FailedPreconditionError(
                    f"card declined for {request.user_id}: {request.amount_cents / 100:.2f} is over the limit"
                )
            self.charges[request.order_id] = request.amount_cents
        return shop_pb2.ChargeResponse(payment_id=f"p-{request.order_id}")

    async def Refund(
        self, request: shop_pb2.RefundRequest, context: grpc.aio.ServicerContext
    ) -> shop_pb2.RefundResponse:
        return shop_pb2.RefundResponse(refunded=self.charges.pop(request.order_id, None) is not None)


def describe_event(event_type: str, payload: bytes) -> str:
    """The notification a person would get for an order event."""
    data = json.loads(payload or b"{}")
    user = USERS.get(str(data.get("user_id", "")))
    to = user.email if user else "?"
    verb = {"order.created": "received", "order.confirmed": "confirmed", "order.cancelled": "cancelled"}.get(
        event_type, event_type
    )
    return f"email to {to}: your order {data.get('order_id')} is {verb}"
