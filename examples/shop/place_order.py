"""The order-placement saga: create order → reserve stock → charge → confirm, compensated in reverse.

Every step sends the saga input (an encoded ``shop.v1.PlaceOrder``) as its
request: each request message of the shop shares PlaceOrder's field numbers,
so a participant reads the fields it needs. A declined payment compensates:
the stock is released and the order cancelled.

For the CLI (docs/security.md), write the definition as protobuf JSON and one order's input::

    python examples/shop/place_order.py DIR    # DIR/place-order.json, DIR/order.bin
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from google.protobuf import duration_pb2, json_format
from rpcmesh.v1 import saga_pb2

from shop.v1 import shop_pb2

SAGA_NAME = "place-order"
INPUT = saga_pb2.PayloadTemplate(base_from="input")


def _step(name: str, service: str, method: str, compensation: str = "") -> saga_pb2.SagaStep:
    return saga_pb2.SagaStep(
        name=name,
        service=service,
        method=method,
        compensation_method=compensation,
        no_compensation=not compensation,
        request=INPUT,
        timeout=duration_pb2.Duration(seconds=5),
        retry=saga_pb2.RetryPolicy(max_attempts=3, initial_backoff=duration_pb2.Duration(nanos=100_000_000)),
    )


def place_order_definition() -> saga_pb2.SagaDefinition:
    """The saga definition, registered by the demo with RegisterDefinition."""
    return saga_pb2.SagaDefinition(
        name=SAGA_NAME,
        steps=[
            _step("create-order", "orders", "/shop.v1.Orders/CreateOrder", "/shop.v1.Orders/CancelOrder"),
            _step(
                "reserve-stock",
                "inventory",
                "/shop.v1.Inventory/ReserveStock",
                "/shop.v1.Inventory/ReleaseStock",
            ),
            _step("charge-payment", "payments", "/shop.v1.Payments/Charge", "/shop.v1.Payments/Refund"),
            _step("confirm-order", "orders", "/shop.v1.Orders/ConfirmOrder"),
        ],
    )


def place_order_input(order_id: str, user_id: str, amount_cents: int, **items: int) -> bytes:
    """The encoded saga input for one order."""
    return shop_pb2.PlaceOrder(
        order_id=order_id,
        user_id=user_id,
        amount_cents=amount_cents,
        items=[shop_pb2.LineItem(sku=sku, quantity=qty) for sku, qty in items.items()],
    ).SerializeToString()


def write_cli_files(folder: Path, order_id: str = "order-1") -> tuple[Path, Path]:
    """Write ``place-order.json`` (the definition) and ``order.bin`` (2 books for u-alice) into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    definition = folder / "place-order.json"
    definition.write_text(json_format.MessageToJson(place_order_definition()), encoding="utf-8")
    order = folder / "order.bin"
    order.write_bytes(place_order_input(order_id, "u-alice", 2_500, book=2))
    return definition, order


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python examples/shop/place_order.py DIR")
    for path in write_cli_files(Path(sys.argv[1])):
        print(path)
