"""The gateway's HTTP/JSON ingress (Connect protocol) for registered services, against real processes.

One control plane, the example shop's ``users`` (two instances) and ``orders``, the echo
example (for a server stream) and `rpcmesh gateway --http-port 0 --route /api/users=users`,
shared by the file's tests; a plain HTTP client (httpx) calls them. Security tests start
gateways of their own with tokens and an access policy.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from google.rpc import error_details_pb2
from shop.v1 import shop_pb2

from rpcmesh.security.tokens import mint_token
from tests.integration.gateway.http_support import Shop, envelope, read_frames, shop_mesh

SECRET = b"gateway-http-test-secret-0123456789abcdef"
ACCESS_POLICY = """\
identities:
  svc-a:
    calls: [users]
"""


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    yield from shop_mesh(tmp_path_factory.mktemp("http-ingress"))


def test_unary_by_grpc_path_and_by_route_json_and_binary(shop: Shop) -> None:
    with httpx.Client(base_url=shop.url, timeout=15) as client:
        reply = client.post("/shop.v1.Users/GetUser", json={"userId": "u-alice"})
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"] == "application/json"
        assert reply.json() == {"user": {"userId": "u-alice", "name": "Alice", "email": "alice@example.com"}}

        routed = client.post("/api/users/GetUser", json={"userId": "u-bob"})
        assert routed.status_code == 200, routed.text
        assert routed.json()["user"]["name"] == "Bob"

        binary = client.post(
            "/api/users/GetUser",
            content=shop_pb2.GetUserRequest(user_id="u-alice").SerializeToString(),
            headers={"content-type": "application/proto"},
        )
        assert binary.status_code == 200 and binary.headers["content-type"] == "application/proto"
        assert shop_pb2.GetUserResponse.FromString(binary.content).user.email == "alice@example.com"


def test_h2c_metadata_correlation_id_and_deadline(shop: Shop) -> None:
    # HTTP/2 without TLS (prior knowledge).
    with httpx.Client(base_url=shop.url, timeout=15, http1=False, http2=True) as client:
        reply = client.post(
            "/echo.v1.Echo/Echo",
            json={"message": "hi"},
            headers={"x-tenant": "t-1", "x-correlation-id": "corr-http-1"},
        )
        assert reply.http_version == "HTTP/2"
        assert reply.status_code == 200, reply.text
        assert (reply.json()["message"], reply.json()["instanceId"]) == ("hi", "echo-1")
        # The caller's correlation id is adopted, passed on to the backend and sent back.
        assert reply.headers["x-correlation-id"] == "corr-http-1"
        assert reply.headers["trailer-echoed-x-correlation-id"] == "corr-http-1"
        assert reply.headers["trailer-echoed-x-tenant"] == "t-1"

        # Without one the gateway creates it; the caller's deadline (connect-timeout-ms) applies.
        started = time.monotonic()
        late = client.post(
            "/echo.v1.Echo/Echo",
            json={"behaviour": {"delayMs": 3000}},
            headers={"connect-timeout-ms": "500"},
        )
        assert late.status_code == 504 and late.json()["code"] == "deadline_exceeded", late.text
        assert time.monotonic() - started < 2.5
        assert len(late.headers["x-correlation-id"]) >= 16


def test_server_stream(shop: Shop) -> None:
    with httpx.Client(base_url=shop.url, timeout=15) as client:
        reply = client.post(
            "/echo.v1.Echo/Expand",
            content=envelope({"message": "x", "repeat": 3}),
            headers={"content-type": "application/connect+json"},
        )
        assert reply.status_code == 200
        messages, end = read_frames(reply.content)
        assert [m["message"] for m in messages] == ["x", "x", "x"]
        assert "error" not in end

        # A stream that fails ends with the backend's status in the end-of-stream message.
        failing = client.post(
            "/echo.v1.Echo/Expand",
            content=envelope({"message": "x", "repeat": 2, "behaviour": {"failCode": 9}}),
            headers={"content-type": "application/connect+json"},
        )
        messages, end = read_frames(failing.content)
        assert end["error"]["code"] == "failed_precondition", end


def test_errors_keep_code_and_details(shop: Shop) -> None:
    with httpx.Client(base_url=shop.url, timeout=15) as client:
        # The backend's INVALID_ARGUMENT with a google.rpc.BadRequest naming the field.
        bad = client.post("/shop.v1.Orders/CreateOrder", json={"userId": "u-alice"})
        assert bad.status_code == 400
        error = bad.json()
        assert error["code"] == "invalid_argument" and error["message"] == "order_id: must not be empty"
        [detail] = error["details"]
        assert detail["type"] == "google.rpc.BadRequest"
        violations = error_details_pb2.BadRequest.FromString(
            base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4))
        ).field_violations
        assert [(v.field, v.description) for v in violations] == [("order_id", "must not be empty")]

        missing = client.post("/api/users/GetUser", json={"userId": "nobody"})
        assert (missing.status_code, missing.json()["code"]) == (404, "not_found")

        for path in ("/nothing-here", "/shop.v1.Users/NoSuchMethod", "/api/users/NoSuchMethod"):
            unknown = client.post(path, json={})
            assert (unknown.status_code, unknown.json()["code"]) == (404, "not_found"), path

        not_json = client.post(
            "/shop.v1.Users/GetUser", content=b"user=u-alice", headers={"content-type": "application/json"}
        )
        assert (not_json.status_code, not_json.json()["code"]) == (400, "invalid_argument")
        unknown_field = client.post("/shop.v1.Users/GetUser", json={"userId": "u-alice", "admin": True})
        assert (unknown_field.status_code, unknown_field.json()["code"]) == (400, "invalid_argument")
        assert '"admin"' in unknown_field.json()["message"]

        # Only Connect/gRPC-Web content types reach a handler; a cross-origin request is refused.
        form = client.post("/shop.v1.Users/GetUser", content=b"{}", headers={"content-type": "text/plain"})
        assert form.status_code == 415
        cross = client.post(
            "/shop.v1.Users/GetUser", json={"userId": "u-alice"}, headers={"origin": "http://evil.example"}
        )
        assert (cross.status_code, cross.json()["code"]) == (403, "permission_denied")
        same = client.post("/shop.v1.Users/GetUser", json={"userId": "u-alice"}, headers={"origin": shop.url})
        assert same.status_code == 200, same.text
