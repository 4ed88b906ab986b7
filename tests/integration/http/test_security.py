"""The HTTP port's security is the gRPC port's: TLS, bearer tokens, the policy per object, mTLS.

`rpcmesh up` with TLS, a token secret and a policy: no token is UNAUTHENTICATED, a valid token
whose identity lacks the grant for this very object is PERMISSION_DENIED, the granted identity
succeeds; with ``--tls-client-auth`` the client certificate's name is the identity.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rpcmesh.security.certs import write_development_set
from rpcmesh.security.tokens import mint_token
from tests.integration.http.conftest import Plane, start_plane

SECRET = b"0123456789abcdef0123456789abcdef-http"

POLICY = """\
admins: [ops]
identities:
  order-service:
    streams: ["order-"]
  reader:
    services: []
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("http-pki")
    write_development_set(folder, clients=["order-service", "reader", "rpcmesh-coordinator"])
    (folder / "token.secret").write_bytes(SECRET)
    (folder / "policy.yaml").write_text(POLICY)
    return folder


def _tls_args(pki: Path) -> list[str]:
    return [
        "--tls-cert",
        str(pki / "server.crt"),
        "--tls-key",
        str(pki / "server.key"),
        "--tls-ca",
        str(pki / "ca.crt"),
        "--policy",
        str(pki / "policy.yaml"),
    ]


@pytest.fixture(scope="module")
def token_plane(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[Plane]:
    running = start_plane(
        tmp_path_factory.mktemp("http-token") / "data",
        *_tls_args(pki),
        "--token-secret-file",
        str(pki / "token.secret"),
    )
    try:
        yield running
    finally:
        running.proc.terminate()


def _verify(pki: Path, identity: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if identity is not None:
        context.load_cert_chain(pki / f"client-{identity}.crt", pki / f"client-{identity}.key")
    return context


def _bearer(identity: str) -> dict[str, str]:
    token = mint_token(SECRET, subject=identity, issuer="rpcmesh", ttl=600.0)
    return {"Authorization": f"Bearer {token}"}


def _append(stream: str) -> dict[str, object]:
    return {"stream": stream, "expectedState": "EXPECTED_STATE_ANY", "events": [{"eventType": "A"}]}


async def test_tokens_and_the_policy_per_object(token_plane: Plane, pki: Path) -> None:
    assert token_plane.url.startswith("https://")
    order = f"order-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=token_plane.url, verify=_verify(pki), timeout=20) as client:
        anonymous = await client.post("/rpcmesh.v1.EventStore/AppendToStream", json=_append(order))
        assert anonymous.status_code == 401
        assert anonymous.json()["code"] == "unauthenticated"

        forged = await client.post(
            "/rpcmesh.v1.EventStore/AppendToStream",
            json=_append(order),
            headers={"Authorization": "Bearer not-a-token"},
        )
        assert forged.json()["code"] == "unauthenticated"

        # A valid identity without a grant for this stream.
        reader = await client.post(
            "/rpcmesh.v1.EventStore/AppendToStream", json=_append(order), headers=_bearer("reader")
        )
        assert reader.status_code == 403
        assert reader.json()["code"] == "permission_denied"

        # The granted identity, on an object outside its grant, then inside it.
        elsewhere = await client.post(
            "/rpcmesh.v1.EventStore/AppendToStream",
            json=_append(f"payment-{uuid.uuid4().hex[:8]}"),
            headers=_bearer("order-service"),
        )
        assert elsewhere.json()["code"] == "permission_denied"
        allowed = await client.post(
            "/rpcmesh.v1.EventStore/AppendToStream", json=_append(order), headers=_bearer("order-service")
        )
        assert allowed.status_code == 200, allowed.text

        read = await client.post(
            "/rpcmesh.v1.EventStore/ReadStream",
            json={"stream": order},
            headers=_bearer("order-service"),
        )
        assert [event["eventType"] for event in read.json()["events"]] == ["A"]

        info = await client.get("/console/info.json")
        assert info.json()["auth"] == "token"


@pytest.fixture(scope="module")
def mtls_plane(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[Plane]:
    running = start_plane(
        tmp_path_factory.mktemp("http-mtls") / "data",
        *_tls_args(pki),
        "--tls-client-auth",
        "--coordinator-cert",
        str(pki / "client-rpcmesh-coordinator.crt"),
        "--coordinator-key",
        str(pki / "client-rpcmesh-coordinator.key"),
    )
    try:
        yield running
    finally:
        running.proc.terminate()


@pytest.mark.parametrize("http2", [False, True])
async def test_client_certificate_is_the_identity(mtls_plane: Plane, pki: Path, http2: bool) -> None:
    order = f"order-{uuid.uuid4().hex[:8]}"
    path = "/rpcmesh.v1.EventStore/AppendToStream"
    async with httpx.AsyncClient(
        base_url=mtls_plane.url, verify=_verify(pki, "order-service"), http2=http2, timeout=20
    ) as client:
        allowed = await client.post(path, json=_append(order))
        assert allowed.status_code == 200, allowed.text
        assert allowed.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        elsewhere = await client.post(path, json=_append(f"payment-{uuid.uuid4().hex[:8]}"))
        assert elsewhere.json()["code"] == "permission_denied"
    async with httpx.AsyncClient(
        base_url=mtls_plane.url, verify=_verify(pki, "reader"), timeout=20
    ) as client:
        reader = await client.post(path, json=_append(order))
        assert reader.json()["code"] == "permission_denied"
        assert "reader" in reader.json()["message"]


async def test_no_client_certificate_no_connection(mtls_plane: Plane, pki: Path) -> None:
    async with httpx.AsyncClient(base_url=mtls_plane.url, verify=_verify(pki), timeout=20) as client:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            await client.post("/grpc.health.v1.Health/Check", json={})
