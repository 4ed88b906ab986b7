"""The gateway's HTTP/JSON ingress (Connect protocol) for registered services, against real processes.

One control plane, the example shop's ``users`` (two instances) and ``orders``, the echo
example (for a server stream) and `rpcmesh gateway --http-port 0 --route /api/users=users`,
shared by the file's tests; a plain HTTP client (httpx) calls them. Security tests start
gateways of their own with tokens and an access policy.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from google.rpc import error_details_pb2
from shop.v1 import shop_pb2

from rpcmesh.client import Mesh
from rpcmesh.gateway import Gateway, GatewayConfig
from rpcmesh.security.certs import create_ca, issue_certificate
from rpcmesh.security.limits import Limits
from rpcmesh.security.settings import SecuritySettings
from rpcmesh.security.tokens import mint_token
from tests.integration.gateway.http_support import (
    HTTP_LINE,
    Shop,
    buf_or_skip,
    envelope,
    read_frames,
    shop_mesh,
)
from tests.support.otlp_collector import CollectedSpan, running_collector
from tests.support.processes import ROOT, ManagedProcess, python_env, rpcmesh_command

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
    assert f"HTTP ingress at {shop.url} is PLAINTEXT too" in shop.entry.output()
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


def test_server_client_and_bidi_streams(shop: Shop) -> None:
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

        # Client streaming (and bidirectional, half-duplex here) are forwarded too.
        words = b"".join(envelope({"message": word}) for word in ("a", "b", "c"))
        collected = client.post(
            "/echo.v1.Echo/Collect", content=words, headers={"content-type": "application/connect+json"}
        )
        messages, end = read_frames(collected.content)
        assert [m["message"] for m in messages] == ["a b c"] and "error" not in end, end
        chat = client.post(
            "/echo.v1.Echo/Chat", content=words, headers={"content-type": "application/connect+json"}
        )
        messages, end = read_frames(chat.content)
        assert [m["message"] for m in messages] == ["a", "b", "c"] and "error" not in end, end

        # gRPC-Web (what browsers' grpc-web clients send): status in a trailer frame (flag 0x80).
        web = client.post(
            "/echo.v1.Echo/Echo",
            content=envelope({"message": "web"}),
            headers={"content-type": "application/grpc-web+json"},
        )
        assert web.status_code == 200 and web.content[0] == 0
        size = int.from_bytes(web.content[1:5], "big")
        assert json.loads(web.content[5 : 5 + size])["message"] == "web"
        assert web.content[5 + size] == 0x80 and b"grpc-status: 0" in web.content[5 + size :]


def test_buf_curl_a_standard_connect_client(shop: Shop) -> None:
    """`buf curl --protocol connect` (shop and echo protos): unary, an error, a bidi stream on h2c."""
    buf = buf_or_skip()

    def curl(data: str, path: str, *flags: str) -> subprocess.CompletedProcess[str]:
        command = [*buf, "curl", "--protocol", "connect", "--schema", "examples/protos", *flags]
        return subprocess.run(
            [*command, "--data", data, shop.url + path], capture_output=True, text=True, timeout=120, cwd=ROOT
        )

    unary = curl('{"userId": "u-alice"}', "/shop.v1.Users/GetUser")
    assert unary.returncode == 0, unary.stderr
    assert json.loads(unary.stdout)["user"]["name"] == "Alice"
    missing = curl('{"userId": "nobody"}', "/shop.v1.Users/GetUser")
    assert missing.returncode != 0 and json.loads(missing.stderr)["code"] == "not_found", missing.stderr
    chat = curl('{"message": "a"}{"message": "b"}', "/echo.v1.Echo/Chat", "--http2-prior-knowledge")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.index('"message": "a"') < chat.stdout.index('"message": "b"')


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

        nobody = client.post(
            "/shop.v1.Users/GetUser", json={"userId": "u-alice"}, headers={"x-rpcmesh-service": "nobody-here"}
        )
        assert nobody.json()["code"] in ("unavailable", "deadline_exceeded"), nobody.text
        oversized = client.post("/shop.v1.Users/GetUser", json={"userId": "x" * (2 * 1024 * 1024)})
        assert (oversized.status_code, oversized.json()["code"]) == (429, "resource_exhausted")

        not_json = client.post(
            "/shop.v1.Users/GetUser", content=b"user=u-alice", headers={"content-type": "application/json"}
        )
        assert (not_json.status_code, not_json.json()["code"]) == (400, "invalid_argument")
        unknown_field = client.post("/shop.v1.Users/GetUser", json={"userId": "u-alice", "admin": True})
        assert (unknown_field.status_code, unknown_field.json()["code"]) == (400, "invalid_argument")
        assert '"admin"' in unknown_field.json()["message"]

        # Only Connect/gRPC/gRPC-Web content types reach a handler; a cross-origin request is refused.
        form = client.post("/shop.v1.Users/GetUser", content=b"{}", headers={"content-type": "text/plain"})
        assert (form.status_code, form.json()["code"]) == (403, "permission_denied")
        cross = client.post(
            "/shop.v1.Users/GetUser", json={"userId": "u-alice"}, headers={"origin": "http://evil.example"}
        )
        assert (cross.status_code, cross.json()["code"]) == (403, "permission_denied")
        same = client.post("/shop.v1.Users/GetUser", json={"userId": "u-alice"}, headers={"origin": shop.url})
        assert same.status_code == 200, same.text


def token(identity: str) -> dict[str, str]:
    return {"authorization": f"Bearer {mint_token(SECRET, subject=identity, issuer='rpcmesh', ttl=600)}"}


def test_authentication_and_per_target_authorization(shop: Shop) -> None:
    secret, policy = shop.tmp / "secret", shop.tmp / "access.yaml"
    secret.write_bytes(SECRET)
    policy.write_text(ACCESS_POLICY)
    url = shop.gateway(
        "--route", "/api/users=users", "--token-secret-file", str(secret), "--insecure",
        "--access-policy", str(policy),
    )  # fmt: skip
    with httpx.Client(base_url=url, timeout=15) as client:
        anonymous = client.post("/api/users/GetUser", json={"userId": "u-alice"})
        assert (anonymous.status_code, anonymous.json()["code"]) == (401, "unauthenticated")
        forged = client.post(
            "/api/users/GetUser", json={"userId": "u-alice"}, headers={"authorization": "Bearer not-a-token"}
        )
        assert (forged.status_code, forged.json()["code"]) == (401, "unauthenticated")

        allowed = client.post("/api/users/GetUser", json={"userId": "u-alice"}, headers=token("svc-a"))
        assert allowed.status_code == 200, allowed.text
        assert client.post(
            "/shop.v1.Users/GetUser", json={"userId": "u-bob"}, headers=token("svc-a")
        ).is_success

        # Another service of the same caller: refused, naming the identity and the target.
        refused = client.post("/shop.v1.Orders/GetOrder", json={"orderId": "o-1"}, headers=token("svc-a"))
        assert (refused.status_code, refused.json()["code"]) == (403, "permission_denied")
        assert "'svc-a'" in refused.json()["message"] and "orders/GetOrder" in refused.json()["message"]
        # Decided before discovery: an unregistered target is refused, not UNAVAILABLE.
        nowhere = client.post(
            "/shop.v1.Users/GetUser",
            json={"userId": "u-alice"},
            headers={**token("svc-a"), "x-rpcmesh-service": "nobody-here"},
        )
        assert (nowhere.status_code, nowhere.json()["code"]) == (403, "permission_denied")
        stranger = client.post("/api/users/GetUser", json={"userId": "u-alice"}, headers=token("stranger"))
        assert (stranger.status_code, stranger.json()["code"]) == (403, "permission_denied")

        # A refused stream ends with the error in its end-of-stream message.
        stream = client.post(
            "/echo.v1.Echo/Expand",
            content=envelope({"message": "x", "repeat": 2}),
            headers={**token("svc-a"), "content-type": "application/connect+json"},
        )
        messages, end = read_frames(stream.content)
        assert messages == [] and end["error"]["code"] == "permission_denied", end


def test_client_certificate_is_the_identity_on_the_https_port(shop: Shop) -> None:
    ca = create_ca()
    ca_cert, _ = ca.write(shop.tmp, "ca")
    server_cert, server_key = issue_certificate(ca, "localhost", names=["127.0.0.1"]).write(shop.tmp, "gw")
    client_cert, client_key = issue_certificate(ca, "svc-a", server=False, client=True).write(shop.tmp, "a")
    policy = shop.tmp / "cert-access.yaml"
    policy.write_text(ACCESS_POLICY)
    url = shop.gateway(
        "--tls-cert", str(server_cert), "--tls-key", str(server_key), "--tls-ca", str(ca_cert),
        "--tls-client-auth", "--access-policy", str(policy),
    )  # fmt: skip
    assert url.startswith("https://")
    trusting = ssl.create_default_context(cafile=str(ca_cert))
    with (
        httpx.Client(base_url=url, timeout=15, verify=trusting) as client,
        pytest.raises(httpx.TransportError),
    ):
        client.post("/api/users/GetUser", json={"userId": "u-alice"})  # no certificate, no connection
    trusting.load_cert_chain(str(client_cert), str(client_key))
    for http2 in (False, True):
        with httpx.Client(base_url=url, timeout=15, verify=trusting, http2=http2) as client:
            reply = client.post("/shop.v1.Users/GetUser", json={"userId": "u-alice"})
            assert reply.status_code == 200, reply.text
            assert reply.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            refused = client.post("/shop.v1.Orders/GetOrder", json={"orderId": "o-1"})
            assert (refused.status_code, refused.json()["code"]) == (403, "permission_denied")
            assert "'svc-a'" in refused.json()["message"]


@pytest.mark.fault
async def test_a_users_instance_killed_under_http_load_is_ridden_over(shop: Shop) -> None:
    """SIGKILL one of the two users instances under 6 concurrent HTTP callers.

    Bound: a call fails only if all its attempts fail (the call policy retries GetUser 4 times,
    ejecting the dead instance); at most the calls in flight when the instance died (one per
    caller, 6) may fail, and none may hang (each has a 10 s client timeout). Every call that
    starts more than 1 s after the kill succeeds.
    """
    outcomes: list[tuple[float, float, int | str]] = []
    stop = asyncio.Event()

    async with httpx.AsyncClient(base_url=shop.url, timeout=10) as client:

        async def caller() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    reply = await client.post("/api/users/GetUser", json={"userId": "u-alice"})
                    outcome: int | str = reply.status_code if reply.status_code != 200 else 200
                    if reply.status_code != 200:
                        outcome = f"{reply.status_code} {reply.text}"
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                outcomes.append((started, time.monotonic(), outcome))

        callers = [asyncio.create_task(caller()) for _ in range(6)]
        await asyncio.sleep(1.5)
        shop.users[0].kill()
        killed_at = time.monotonic()
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*callers), timeout=30)

    failures = [outcome for _, _, outcome in outcomes if outcome != 200]
    assert len(outcomes) > 50
    assert len(failures) <= 6, failures
    late = [outcome for started, _, outcome in outcomes if started > killed_at + 1.0]
    assert late and all(outcome == 200 for outcome in late), failures
    assert max(ended - started for started, ended, _ in outcomes) < 10


def test_trace_and_correlation_id_continue_through_the_gateway(shop: Shop) -> None:
    """The caller's traceparent: the gateway's SERVER span is its child, the backend's span a descendant."""
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with running_collector() as collector:

        def traced(args: list[str], name: str) -> ManagedProcess:
            env = python_env(
                {
                    "OTEL_SERVICE_NAME": name,
                    "OTEL_TRACES_EXPORTER": "otlp",
                    "OTEL_METRICS_EXPORTER": "none",
                    "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                    "OTEL_BSP_SCHEDULE_DELAY": "50",
                }
            )
            proc = ManagedProcess(args, env=env)
            shop.started.append(proc)
            proc.wait_for_address()
            return proc

        echo = [sys.executable, str(ROOT / "examples" / "echo" / "server.py"), "--registry", shop.registry]
        traced([*echo, "--name", "echo-traced", "--instance-id", "traced-1"], "echo-traced")
        gateway = traced(
            rpcmesh_command("gateway", "--registry", shop.registry, "--port", "0", "--http-port", "0"),
            "gateway",
        )
        url = gateway.wait_for_line(HTTP_LINE).group(1)
        with httpx.Client(base_url=url, timeout=15) as client:
            reply = client.post(
                "/echo.v1.Echo/Echo",
                json={"message": "traced"},
                headers={
                    "traceparent": f"00-{trace_id}-{caller_span}-01",
                    "x-correlation-id": "corr-traced-1",
                    "x-rpcmesh-service": "echo-traced",
                },
            )
            assert reply.status_code == 200, reply.text

        def complete(spans: list[CollectedSpan]) -> bool:
            return any(s.service == "echo-traced" and s.name == "echo.v1.Echo/Echo" for s in spans) and any(
                s.service == "gateway" and s.kind == "SERVER" for s in spans
            )

        spans = [s for s in collector.wait_for_spans(complete, timeout=30) if s.trace_id == trace_id]
    index = {s.span_id: s for s in spans}
    [entry] = [s for s in spans if s.service == "gateway" and s.kind == "SERVER"]
    assert entry.parent_span_id == caller_span and entry.name == "echo.v1.Echo/Echo"
    # (The backend's reflection answer to the gateway is in the trace too.)
    [backend] = [s for s in spans if s.service == "echo-traced" and s.name == "echo.v1.Echo/Echo"]
    ancestors, span = [], backend
    while span.parent_span_id in index:
        span = index[span.parent_span_id]
        ancestors.append(span.span_id)
    assert entry.span_id in ancestors
    assert {s.attributes.get("rpcmesh.correlation_id") for s in (entry, backend)} == {"corr-traced-1"}


async def test_calls_in_flight_per_connection_are_limited_as_on_grpc(shop: Shop) -> None:
    """An in-process gateway allowing 1 call per connection: a second call on one h2 connection is refused."""
    limits = Limits(max_calls_per_connection=1)
    config = GatewayConfig(registry=[shop.registry], http_port=0, security=SecuritySettings(limits=limits))
    async with Mesh([shop.registry]) as mesh:
        gateway = Gateway(config, mesh)
        await gateway.start()
        try:
            async with httpx.AsyncClient(
                base_url=gateway.http.url, timeout=15, http1=False, http2=True
            ) as client:
                slow = client.post(
                    "/echo.v1.Echo/Echo", json={"message": "slow", "behaviour": {"delayMs": 1500}}
                )
                first = asyncio.create_task(slow)
                await asyncio.sleep(0.5)
                second = await client.post("/echo.v1.Echo/Echo", json={"message": "fast"})
                assert (second.status_code, second.json()["code"]) == (429, "resource_exhausted"), second.text
                assert (await first).status_code == 200
                # Released once done: the connection takes calls again.
                assert (await client.post("/echo.v1.Echo/Echo", json={"message": "again"})).status_code == 200
        finally:
            await gateway.stop()


def test_a_taken_http_port_or_a_path_route_without_it_fails_the_start_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, code, line in (
            (["--http-port", str(port)], 1, f"cannot listen on 127.0.0.1:{port} (HTTP)"),
            (["--route", "/api/users=users"], 2, "HTTP path routes need --http-port"),
        ):
            done = subprocess.run(
                rpcmesh_command("gateway", "--registry", "127.0.0.1:1", *args),
                capture_output=True, text=True, timeout=60, env=python_env(), cwd=ROOT,
            )  # fmt: skip
            assert done.returncode == code and line in done.stderr, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr


async def test_streams_abandoned_on_a_closed_h2_connection_do_not_hold_the_shutdown(shop: Shop) -> None:
    """Server streams whose HTTP/2 connection closes while the backend works: stop() is quick.

    It waited the whole 10 s grace before: hypercorn never took the end of those streams.
    """
    config = GatewayConfig(registry=[shop.registry], http_port=0, grace=10)
    async with Mesh([shop.registry]) as mesh:
        gateway = Gateway(config, mesh)
        await gateway.start()
        try:
            client = httpx.AsyncClient(base_url=gateway.http.url, timeout=15, http1=False, http2=True)
            slow = envelope({"message": "x", "repeat": 2, "behaviour": {"delayMs": 4000}})

            async def read() -> None:
                headers = {"content-type": "application/connect+json"}
                async with client.stream(
                    "POST", "/echo.v1.Echo/Expand", content=slow, headers=headers
                ) as reply:
                    async for _ in reply.aiter_bytes():
                        pass

            readers = [asyncio.create_task(read()) for _ in range(3)]
            await asyncio.sleep(1.0)
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await client.aclose()
            await asyncio.sleep(0.3)
        finally:
            started = time.monotonic()
            await gateway.stop()
        assert time.monotonic() - started < 5
