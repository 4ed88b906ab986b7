"""Fixtures of the security suite: a development PKI, and `rpcmesh up` with TLS/mTLS, tokens and a policy."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc.aio
import pytest

from rpcmesh.security.certs import create_ca, issue_certificate, write_development_set
from rpcmesh.security.client import ClientSecurity, aio_channel
from rpcmesh.security.tls import ClientTlsConfig
from rpcmesh.security.tokens import mint_token
from tests.support.processes import ManagedProcess, start_control_plane

POLICY = """\
admins: [ops]
identities:
  order-service:
    publish: ["orders.>"]
    subscribe: ["orders.>", "payments.*"]
    sagas: [place-order]
    streams: ["order-"]
  reader:
    services: []
"""


@dataclass(frozen=True)
class Pki:
    """Certificates and token material in one folder."""

    folder: Path
    secret: bytes

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    def token(self, subject: str, ttl: float = 600.0, **kwargs: object) -> str:
        return mint_token(self.secret, subject=subject, issuer="rpcmesh", ttl=ttl, **kwargs)  # type: ignore[arg-type]

    def client(self, identity: str) -> ClientTlsConfig:
        """MTLS client settings with the identity's certificate."""
        return ClientTlsConfig(
            ca_file=self.ca,
            cert_file=self.folder / f"client-{identity}.crt",
            key_file=self.folder / f"client-{identity}.key",
        )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    write_development_set(folder, clients=["order-service", "ops", "reader", "rpcmesh-coordinator"])
    secret = b"0123456789abcdef0123456789abcdef-test"
    (folder / "token.secret").write_bytes(secret)
    (folder / "policy.yaml").write_text(POLICY)
    # A foreign CA, its client certificate, and an expired client certificate from our CA.
    foreign = create_ca("foreign CA")
    foreign.write(folder, "foreign-ca")
    issue_certificate(foreign, "order-service", client=True, server=True, names=["127.0.0.1"]).write(
        folder, "client-foreign"
    )
    from rpcmesh.security.certs import CertificateAuthority

    ours = CertificateAuthority.load(folder / "ca.crt", folder / "ca.key")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    issue_certificate(
        ours,
        "order-service",
        client=True,
        server=True,
        names=["127.0.0.1"],
        not_before=past,
        validity=datetime.timedelta(days=1),
    ).write(folder, "client-expired")
    return Pki(folder=folder, secret=secret)


def coordinator_args(folder: Path) -> list[str]:
    """`rpcmesh up` flags for the saga coordinator's client certificate (mTLS needs one)."""
    return [
        "--coordinator-cert",
        str(folder / "client-rpcmesh-coordinator.crt"),
        "--coordinator-key",
        str(folder / "client-rpcmesh-coordinator.key"),
    ]


def _start(tmp: Path, pki: Pki, *extra: str) -> tuple[ManagedProcess, str]:
    return start_control_plane(
        tmp / "data",
        "--tls-cert",
        str(pki.folder / "server.crt"),
        "--tls-key",
        str(pki.folder / "server.key"),
        "--tls-ca",
        str(pki.ca),
        "--token-secret-file",
        str(pki.folder / "token.secret"),
        "--policy",
        str(pki.folder / "policy.yaml"),
        *extra,
    )


@pytest.fixture(scope="module")
def tls_plane(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[str]:
    """`rpcmesh up` with TLS, bearer tokens and the policy; yields its address."""
    proc, address = _start(tmp_path_factory.mktemp("tls-plane"), pki)
    try:
        yield address
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def mtls_plane(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[str]:
    """`rpcmesh up` requiring client certificates (mTLS), with the policy; yields its address."""
    proc, address = _start(
        tmp_path_factory.mktemp("mtls-plane"), pki, "--tls-client-auth", *coordinator_args(pki.folder)
    )
    try:
        yield address
    finally:
        proc.kill()


class Channels:
    """Opens channels for a test and closes them all at the end."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self._open: list[grpc.aio.Channel] = []

    def tls(self, address: str, token: str | None = None) -> grpc.aio.Channel:
        channel = aio_channel(address, ClientSecurity(tls=ClientTlsConfig(ca_file=self.pki.ca), token=token))
        self._open.append(channel)
        return channel

    def as_identity(self, address: str, identity: str) -> grpc.aio.Channel:
        return self.tls(address, self.pki.token(identity))

    def mtls(self, address: str, tls: ClientTlsConfig, token: str | None = None) -> grpc.aio.Channel:
        channel = aio_channel(address, ClientSecurity(tls=tls, token=token))
        self._open.append(channel)
        return channel

    def plaintext(self, address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        self._open.append(channel)
        return channel

    async def close(self) -> None:
        for channel in self._open:
            await channel.close()


@pytest.fixture
async def channels(pki: Pki) -> object:
    opened = Channels(pki)
    try:
        yield opened
    finally:
        await opened.close()
