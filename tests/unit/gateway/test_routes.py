"""Gateway routing: route table, header override, naming convention, shapes from descriptors."""

from __future__ import annotations

import pytest
from echo.v1 import echo_pb2
from google.protobuf import descriptor_pb2

from rpcmesh.errors import InvalidArgumentError
from rpcmesh.gateway.routes import SERVICE_HEADER, RouteTable, default_service_name, split_method
from rpcmesh.gateway.shapes import Shape, shapes_from_files


def test_split_method() -> None:
    assert split_method("/shop.v1.Orders/CreateOrder") == ("shop.v1.Orders", "CreateOrder")
    for bad in ("shop.v1.Orders/CreateOrder", "/shop.v1.Orders", "//x", "/a/b/c"):
        with pytest.raises(InvalidArgumentError, match="method"):
            split_method(bad)


def test_convention_is_the_lowercased_simple_name() -> None:
    assert default_service_name("shop.v1.Orders") == "orders"
    assert default_service_name("Echo") == "echo"


def test_exact_routes_beat_prefixes_and_longer_prefixes_win() -> None:
    table = RouteTable.parse(["shop.v1.Orders=order-service", "shop.*=shop-main", "shop.v1.*=shop-v1"])
    assert table.resolve("/shop.v1.Orders/Get") == "order-service"
    assert table.resolve("/shop.v1.Payments/Charge") == "shop-v1"
    assert table.resolve("/shop.v2.Payments/Charge") == "shop-main"
    assert table.resolve("/echo.v1.Echo/Echo") == "echo"


def test_header_override_is_validated_and_can_be_disabled() -> None:
    table = RouteTable()
    assert table.resolve("/echo.v1.Echo/Echo", {SERVICE_HEADER: "echo-blue"}) == "echo-blue"
    with pytest.raises(InvalidArgumentError, match=SERVICE_HEADER):
        table.resolve("/echo.v1.Echo/Echo", {SERVICE_HEADER: "Not A Name"})
    strict = RouteTable(allow_header=False, use_convention=False, routes={"echo.v1.Echo": "echo"})
    assert strict.resolve("/echo.v1.Echo/Echo", {SERVICE_HEADER: "other"}) == "echo"
    with pytest.raises(InvalidArgumentError, match="no route"):
        strict.resolve("/shop.v1.Orders/Get")


def test_bad_route_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="--route"):
        RouteTable.parse(["shop.v1.Orders"])
    with pytest.raises(ValueError, match="not a valid service name"):
        RouteTable.parse(["shop.v1.Orders=Orders_Service"])


def test_shapes_from_the_echo_descriptor() -> None:
    proto = descriptor_pb2.FileDescriptorProto()
    echo_pb2.DESCRIPTOR.CopyToProto(proto)
    shapes = shapes_from_files([proto.SerializeToString()], "echo.v1.Echo")
    assert shapes == {
        "Echo": Shape.UNARY_UNARY,
        "Expand": Shape.UNARY_STREAM,
        "Collect": Shape.STREAM_UNARY,
        "Chat": Shape.STREAM_STREAM,
    }
    assert shapes_from_files([proto.SerializeToString()], "echo.v1.Other") == {}
