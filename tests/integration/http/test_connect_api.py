"""The Connect protocol on `rpcmesh up --http-port`: a plain HTTP client calls Registry and EventStore.

Unary and server-streaming calls over HTTP/1.1 and HTTP/2 (h2c prior knowledge), the codes of
bad input (JSON that does not parse, unknown fields, a body over the gRPC port's receive
limit), ``google.rpc`` details in the error JSON, the CSRF rules and the console's files.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from rpcmesh.v1 import eventstore_pb2

from tests.integration.http.conftest import (
    JSON,
    STREAM_JSON,
    Plane,
    detail_bytes,
    detail_types,
    envelope,
    envelopes,
)


def _instance(service: str, instance_id: str) -> dict[str, object]:
    return {
        "instance": {"service": service, "instanceId": instance_id, "address": "127.0.0.1:9"},
        "ttl": "60s",
    }


async def test_unary_register_then_resolve_over_http1(plane: Plane) -> None:
    async with httpx.AsyncClient(base_url=plane.url, timeout=20) as client:
        registered = await client.post("/rpcmesh.v1.Registry/Register", json=_instance("http-users", "u1"))
        assert registered.status_code == 200, registered.text
        assert registered.headers["content-type"] == "application/json"
        assert registered.json()["leaseToken"]

        resolved = await client.post(
            "/rpcmesh.v1.Registry/Resolve", headers=JSON, content=b'{"service": "http-users"}'
        )
        assert resolved.status_code == 200, resolved.text
        assert [item["instanceId"] for item in resolved.json()["instances"]] == ["u1"]
        assert resolved.http_version == "HTTP/1.1"


async def test_unary_call_over_http2_prior_knowledge(plane: Plane) -> None:
    async with httpx.AsyncClient(base_url=plane.url, http1=False, http2=True, timeout=20) as client:
        response = await client.post("/grpc.health.v1.Health/Check", json={"service": "rpcmesh.v1.Registry"})
    assert response.http_version == "HTTP/2"
    assert response.json() == {"status": "SERVING"}


async def test_watch_streams_the_snapshot_then_live_changes(plane: Plane) -> None:
    async with (
        httpx.AsyncClient(base_url=plane.url, timeout=20) as client,
        client.stream(
            "POST",
            "/rpcmesh.v1.Registry/Watch",
            headers=STREAM_JSON,
            content=envelope({"service": "http-watched"}),
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/connect+json"
        messages = envelopes(response)
        async with asyncio.timeout(20):
            flags, snapshot = await anext(messages)
            assert flags == 0 and snapshot["snapshot"] is True
            registered = await client.post(
                "/rpcmesh.v1.Registry/Register", json=_instance("http-watched", "w1")
            )
            assert registered.status_code == 200, registered.text
            while True:
                flags, change = await anext(messages)
                assert flags == 0, change
                ids = [event["instance"]["instanceId"] for event in change.get("events", [])]
                if "w1" in ids:
                    break


async def test_event_store_append_and_subscribe_stream(plane: Plane) -> None:
    stream = f"order-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=plane.url, timeout=20) as client:
        appended = await client.post(
            "/rpcmesh.v1.EventStore/AppendToStream",
            json={
                "stream": stream,
                "expectedState": "EXPECTED_STATE_NO_STREAM",
                "events": [{"eventType": "OrderPlaced", "data": "eyJpZCI6IDF9"}],
            },
        )
        assert appended.status_code == 200, appended.text
        async with client.stream(
            "POST",
            "/rpcmesh.v1.EventStore/SubscribeToStream",
            headers=STREAM_JSON,
            content=envelope({"stream": stream, "afterRevision": "-1"}),
        ) as response:
            async with asyncio.timeout(20):
                async for flags, message in envelopes(response):
                    assert flags == 0, message
                    if message.get("events"):
                        assert message["events"][0]["eventType"] == "OrderPlaced"
                        break


async def test_bad_input_gets_the_documented_codes(plane: Plane) -> None:
    async with httpx.AsyncClient(base_url=plane.url, timeout=20) as client:
        bad_json = await client.post("/rpcmesh.v1.Registry/Resolve", headers=JSON, content=b'{"service": ')
        assert bad_json.status_code == 400
        assert bad_json.json()["code"] == "invalid_argument"

        unknown = await client.post("/rpcmesh.v1.Registry/Resolve", json={"service": "x", "colour": "red"})
        assert unknown.status_code == 400
        assert unknown.json()["code"] == "invalid_argument"
        assert "colour" in unknown.json()["message"]

        # Over the gRPC port's receive limit (1.5 MiB by default).
        big = {"stream": "order-big", "events": [{"eventType": "Big", "data": "QUFB" * 600_000}]}
        # On a connection of its own: the server refuses before reading the whole body and then
        # closes the connection, which a reused keep-alive connection can meet mid-request
        # ("Server disconnected without sending a response", once in CI).
        oversized = await client.post(
            "/rpcmesh.v1.EventStore/AppendToStream", json=big, headers={"Connection": "close"}
        )
        assert oversized.json()["code"] == "resource_exhausted"
        assert oversized.status_code == 429

        # The handlers' own validation, named field and all, as over gRPC.
        invalid = await client.post("/rpcmesh.v1.Registry/Resolve", json={"service": "Not A Label"})
        assert invalid.json()["code"] == "invalid_argument"
        assert "service" in invalid.json()["message"]


async def test_wrong_expected_revision_has_the_grpc_code_and_details(plane: Plane) -> None:
    stream = f"order-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=plane.url, timeout=20) as client:
        first = await client.post(
            "/rpcmesh.v1.EventStore/AppendToStream",
            json={"stream": stream, "expectedState": "EXPECTED_STATE_ANY", "events": [{"eventType": "A"}]},
        )
        assert first.status_code == 200, first.text
        wrong = await client.post(
            "/rpcmesh.v1.EventStore/AppendToStream",
            json={"stream": stream, "expectedRevision": "5", "events": [{"eventType": "B"}]},
        )
    error = wrong.json()
    assert error["code"] == "failed_precondition", error
    assert "rpcmesh.v1.WrongExpectedVersion" in detail_types(error)
    detail = eventstore_pb2.WrongExpectedVersion.FromString(
        detail_bytes(error, "rpcmesh.v1.WrongExpectedVersion")
    )
    assert detail.stream == stream
    assert detail.current_revision == 0


async def test_cross_origin_and_form_posts_are_refused_and_change_nothing(plane: Plane) -> None:
    async with httpx.AsyncClient(base_url=plane.url, timeout=20) as client:
        cross = await client.post(
            "/rpcmesh.v1.Registry/Register",
            json=_instance("http-csrf", "evil"),
            headers={"Origin": "https://evil.example"},
        )
        assert cross.status_code == 403
        assert cross.json()["code"] == "permission_denied"

        form = await client.post(
            "/rpcmesh.v1.Registry/Register",
            content=b"instance=evil",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert form.status_code == 403
        plain = await client.post(
            "/rpcmesh.v1.Registry/Register", content=b"{}", headers={"Content-Type": "text/plain"}
        )
        assert plain.status_code == 403

        resolved = await client.post("/rpcmesh.v1.Registry/Resolve", json={"service": "http-csrf"})
        assert resolved.json().get("instances", []) == []

        # The console itself (same origin) may call.
        same = await client.post(
            "/rpcmesh.v1.Registry/Resolve", json={"service": "http-csrf"}, headers={"Origin": plane.url}
        )
        assert same.status_code == 200


@pytest.mark.parametrize("path", ["/", "/console/info.json"])
async def test_console_files_and_info(plane: Plane, path: str) -> None:
    async with httpx.AsyncClient(base_url=plane.url, timeout=20) as client:
        response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    if path == "/":
        assert response.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in response.headers["content-security-policy"]
    else:
        info = response.json()
        assert info["grpc_address"] == plane.grpc_address
        assert (info["store"], info["bus"], info["auth"]) == ("sqlite", "sqlite", "none")
        assert set(info) >= {"version", "store", "bus", "node_id", "auth", "grpc_address"}
