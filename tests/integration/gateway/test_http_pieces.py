"""The HTTP ingress's pure pieces: path routes, forwarded headers, error conversion, schemas."""

from __future__ import annotations

import base64

import grpc
import pytest
from connectrpc.code import Code
from google.protobuf import descriptor_pb2, duration_pb2, timestamp_pb2
from rpcmesh.v1 import registry_pb2

from rpcmesh.errors import InvalidArgumentError, NotFoundError, StatusError, invalid_argument
from rpcmesh.gateway.http_calls import connect_error, forwardable_headers
from rpcmesh.gateway.routes import HttpRoutes, split_route_specs
from rpcmesh.gateway.shapes import Shape, schema_from_files


def test_path_routes_match_prefix_and_method_only() -> None:
    routes = HttpRoutes.parse(["/api/users=users", "/v1/shop/orders/=orders"])
    assert routes.match("/api/users/GetUser") == ("users", "GetUser")
    assert routes.match("/v1/shop/orders/CreateOrder") == ("orders", "CreateOrder")
    for path in (
        "/api/users",
        "/api/users/",
        "/api/users/x/GetUser",
        "/api/GetUser",
        "/shop.v1.Users/GetUser",
    ):
        assert routes.match(path) is None, path
    assert split_route_specs(["shop.v1.Users=users", "/api/users=users", "legacy.*=old"]) == (
        ["shop.v1.Users=users", "legacy.*=old"],
        ["/api/users=users"],
    )


@pytest.mark.parametrize(
    "spec", ["/api/users", "/api/users=Users", "/api users=users", "/=users", "api=users"]
)
def test_bad_path_routes_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="--route"):
        HttpRoutes.parse([spec])


def test_only_custom_headers_are_forwarded_and_bin_ones_decoded() -> None:
    headers = [
        ("host", "gw:80"),
        ("content-type", "application/json"),
        ("authorization", "Bearer secret"),
        ("connect-timeout-ms", "500"),
        ("connect-protocol-version", "1"),
        ("grpc-timeout", "1S"),
        ("origin", "http://gw:80"),
        ("cookie", "a=b"),
        ("x-tenant", "t-1"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("x-blob-bin", base64.b64encode(b"\x00\x01").decode().rstrip("=")),
    ]
    assert forwardable_headers(headers) == (
        ("x-tenant", "t-1"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("x-blob-bin", b"\x00\x01"),
    )
    with pytest.raises(InvalidArgumentError, match="x-blob-bin"):
        forwardable_headers([("x-blob-bin", "not base64!")])


def test_status_errors_become_connect_errors_with_their_details() -> None:
    error = connect_error(invalid_argument("order_id", "must not be empty"))
    assert (error.code, error.message) == (Code.INVALID_ARGUMENT, "order_id: must not be empty")
    assert [detail.type_name for detail in error.details] == ["google.rpc.BadRequest"]
    assert connect_error(NotFoundError("user 'x' not found")).code is Code.NOT_FOUND
    assert connect_error(StatusError("gone", code=grpc.StatusCode.CANCELLED)).code is Code.CANCELED
    assert connect_error(RuntimeError("boom")).code is Code.UNKNOWN


def test_schema_from_reflection_files_in_any_order() -> None:
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb).SerializeToString()
        for module in (registry_pb2, duration_pb2, timestamp_pb2)
    ]
    schema = schema_from_files(files, "rpcmesh.v1.Registry")
    assert schema is not None
    resolve = schema.method("Resolve")
    assert resolve is not None and schema.method("Nope") is None
    request_class = schema.message_class(resolve.input_type)
    assert (
        request_class.FromString(registry_pb2.ResolveRequest(service="users").SerializeToString()).service
        == "users"
    )
    assert schema.shapes()["Watch"] is Shape.UNARY_STREAM
    assert schema_from_files(files, "rpcmesh.v1.Nothing") is None
    assert schema_from_files(files[:1], "rpcmesh.v1.Registry") is None  # its dependencies are missing
