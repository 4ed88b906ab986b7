"""Fixtures of the wiring suite: a development PKI and real processes (`rpcmesh up`, echo hosts, gateway).

Every process is started on port 0 with its security and telemetry taken from the
environment, exactly as an operator would run it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rpcmesh.security.certs import create_ca, issue_certificate, write_development_set
from rpcmesh.security.client import ClientSecurity
from rpcmesh.security.tls import ClientTlsConfig
from rpcmesh.security.tokens import mint_token
from tests.support.processes import ROOT, ManagedProcess, python_env, rpcmesh_command

POLICY = """\
admins: [ops]
identities:
  echo: {}
  relay: {}
  gateway:
    services: []
  client:
    services: []
  intruder:
    services: [not-echo]
"""

IDENTITIES = ("echo", "relay", "gateway", "client", "intruder", "ops", "rpcmesh-coordinator")


@dataclass(frozen=True)
class Pki:
    """A development CA, a server certificate, client certificates, a token secret and a policy."""

    folder: Path
    secret: bytes

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def secret_file(self) -> Path:
        return self.folder / "token.secret"

    @property
    def policy(self) -> Path:
        return self.folder / "policy.yaml"

    def token(self, identity: str) -> str:
        return mint_token(self.secret, subject=identity, issuer="rpcmesh", ttl=600.0)

    def client_cert(self, identity: str) -> tuple[Path, Path]:
        return self.folder / f"client-{identity}.crt", self.folder / f"client-{identity}.key"

    def tls_client(self, identity: str | None = None, *, ca: Path | None = None) -> ClientTlsConfig:
        """Client TLS trusting ``ca`` (our CA by default), with ``identity``'s certificate for mTLS."""
        if identity is None:
            return ClientTlsConfig(ca_file=ca or self.ca)
        cert, key = self.client_cert(identity)
        return ClientTlsConfig(ca_file=ca or self.ca, cert_file=cert, key_file=key)

    def token_client(self, identity: str | None) -> ClientSecurity:
        """TLS plus ``identity``'s bearer token (no token when None)."""
        return ClientSecurity(tls=self.tls_client(), token=self.token(identity) if identity else None)

    def mtls_client(self, identity: str) -> ClientSecurity:
        """MTLS with ``identity``'s certificate."""
        return ClientSecurity(tls=self.tls_client(identity))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("wiring-pki")
    write_development_set(folder, clients=list(IDENTITIES))
    secret = b"wiring-test-secret-0123456789abcdef"
    (folder / "token.secret").write_bytes(secret)
    (folder / "policy.yaml").write_text(POLICY)
    foreign = create_ca("foreign CA")
    foreign.write(folder, "foreign-ca")
    issue_certificate(foreign, "client", client=True, server=False).write(folder, "client-foreign")
    return Pki(folder=folder, secret=secret)


class Processes:
    """Starts real processes for one test and kills them all at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[ManagedProcess] = []

    def start(self, args: list[str], env: dict[str, str]) -> tuple[ManagedProcess, str]:
        proc = ManagedProcess(args, env=python_env(env))
        self.started.append(proc)
        return proc, proc.wait_for_address(timeout=30)

    def control_plane(self, *args: str, env: dict[str, str] | None = None) -> str:
        data = self.tmp_path / f"plane-{len(self.started)}"
        _, address = self.start(
            rpcmesh_command("up", "--port", "0", "--data-dir", str(data), *args), env or {}
        )
        return address

    def echo(
        self, registry: str, instance_id: str, env: dict[str, str], *args: str
    ) -> tuple[ManagedProcess, str]:
        script = str(ROOT / "examples" / "echo" / "server.py")
        return self.start(
            [sys.executable, script, "--registry", registry, "--instance-id", instance_id, *args], env
        )

    def gateway(self, registry: str, env: dict[str, str], *args: str) -> str:
        _, address = self.start(rpcmesh_command("gateway", "--registry", registry, "--port", "0", *args), env)
        return address

    def stop(self) -> None:
        for proc in self.started:
            proc.kill()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop()
