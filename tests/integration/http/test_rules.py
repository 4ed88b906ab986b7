"""The HTTP layer's pure rules: which requests may reach a handler (CSRF), headers as gRPC metadata."""

from __future__ import annotations

import grpc
import pytest
from connectrpc.code import Code

from rpcmesh.http import csrf_refusal
from rpcmesh.http.context import HttpServicerContext, connect_code, metadata_from_headers


def _scope(**headers: str) -> dict[str, object]:
    return {
        "type": "http",
        "scheme": "http",
        "server": ("127.0.0.1", 8080),
        "headers": [(key.replace("_", "-").encode(), value.encode()) for key, value in headers.items()],
    }


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/connect+json",
        "application/proto",
        "application/grpc-web+proto",
        "application/grpc",
    ],
)
def test_protocol_content_types_from_this_origin_pass(content_type: str) -> None:
    assert csrf_refusal(_scope(host="127.0.0.1:8080", content_type=content_type)) is None
    same = _scope(host="127.0.0.1:8080", content_type=content_type, origin="http://127.0.0.1:8080")
    assert csrf_refusal(same) is None


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""],
)
def test_what_a_form_can_send_is_refused(content_type: str) -> None:
    reason = csrf_refusal(_scope(host="127.0.0.1:8080", content_type=content_type))
    assert reason is not None and "content type" in reason


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "http://127.0.0.1:9999", "https://127.0.0.1:8080", "null"]
)
def test_another_origin_is_refused(origin: str) -> None:
    reason = csrf_refusal(_scope(host="127.0.0.1:8080", content_type="application/json", origin=origin))
    assert reason is not None and "cross-origin" in reason


def test_headers_become_grpc_metadata() -> None:
    metadata = metadata_from_headers(
        [
            ("Authorization", "Bearer t"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("x-correlation-id", "c-1"),
            ("x-blob-bin", "AAEC"),
            ("content-type", "application/json"),
            ("connect-timeout-ms", "100"),
            ("cookie", "session=1"),
        ]
    )
    assert dict(metadata) == {
        "authorization": "Bearer t",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "x-correlation-id": "c-1",
        "x-blob-bin": b"\x00\x01\x02",
    }


async def test_abort_keeps_code_message_and_details() -> None:
    from rpcmesh.v1 import eventstore_pb2

    from rpcmesh.errors import FailedPreconditionError

    context = HttpServicerContext(
        method="/rpcmesh.v1.EventStore/AppendToStream",
        headers=[],
        client_address="10.0.0.1:5000",
        common_name="order-service",
        time_remaining=lambda: None,
    )
    assert context.peer() == "ipv4:10.0.0.1:5000"
    assert dict(context.auth_context())["x509_common_name"] == [b"order-service"]
    detail = eventstore_pb2.WrongExpectedVersion(stream="s", current_revision=3)
    with pytest.raises(grpc.aio.AbortError):
        await context.abort_with_status(FailedPreconditionError("wrong", details=[detail]).to_rpc_status())
    error = context.connect_error()
    assert (error.code, error.message) == (Code.FAILED_PRECONDITION, "wrong")
    assert [item.type_name for item in error.details] == ["rpcmesh.v1.WrongExpectedVersion"]
    assert eventstore_pb2.WrongExpectedVersion.FromString(error.details[0].message_bytes) == detail
    assert connect_code(grpc.StatusCode.CANCELLED) is Code.CANCELED
