"""Secure mode from the CLI: a failed TLS handshake is named, and `rpcmesh up` refuses to start
without its coordinator's identity (one line naming the missing flag, exit 1)."""  # noqa: D205, D209

from __future__ import annotations

import contextlib
import datetime
import io
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rpcmesh.cli.main import build_parser
from rpcmesh.security.certs import CertificateAuthority, issue_certificate, write_development_set
from tests.support.processes import ROOT, python_env, rpcmesh_command, start_control_plane

POLICY = """\
admins: [ops]
identities:
  rpcmesh-coordinator:
    services: []
"""


@dataclass(frozen=True)
class Plane:
    """An mTLS `rpcmesh up` and the folder of its certificates."""

    certs: Path
    address: str


def _own_lines(stderr: str) -> list[str]:
    """The CLI's lines, without grpc core's own log lines ("I1204 12:00:00.0 ...")."""
    return [line for line in stderr.strip().splitlines() if not re.match(r"^[IWE]\d{4} ", line)]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        rpcmesh_command(*args),
        env=python_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("secure-mode-pki")
    write_development_set(folder, clients=["rpcmesh-coordinator", "ops"])
    (folder / "policy.yaml").write_text(POLICY)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    write_development_set(folder / "other")  # a foreign CA
    home = CertificateAuthority.load(folder / "ca.crt", folder / "ca.key")
    issue_certificate(
        home, "ops", client=True, server=False, not_before=past, validity=datetime.timedelta(days=1)
    ).write(folder, "client-expired")
    issue_certificate(
        home, "server", names=["127.0.0.1"], not_before=past, validity=datetime.timedelta(days=1)
    ).write(folder, "server-expired")
    return folder


@pytest.fixture(scope="module")
def plane(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    # fmt: off
    proc, address = start_control_plane(
        tmp_path_factory.mktemp("secure-mode-plane"),
        "--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
        "--tls-ca", str(certs / "ca.crt"), "--tls-client-auth", "--policy", str(certs / "policy.yaml"),
        "--coordinator-cert", str(certs / "client-rpcmesh-coordinator.crt"),
        "--coordinator-key", str(certs / "client-rpcmesh-coordinator.key"),
    )
    # fmt: on
    try:
        yield Plane(certs=certs, address=address)
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def expired_plane(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    """`rpcmesh up` serving TLS with an expired server certificate."""
    proc, address = start_control_plane(
        tmp_path_factory.mktemp("expired-plane"),
        "--tls-cert", str(certs / "server-expired.crt"), "--tls-key", str(certs / "server-expired.key"),
    )  # fmt: skip
    try:
        yield Plane(certs=certs, address=address)
    finally:
        proc.kill()


def test_an_expired_server_certificate_is_named(expired_plane: Plane) -> None:
    ca = str(expired_plane.certs / "ca.crt")
    result = _run("services", "--target", expired_plane.address, "--timeout", "5", "--tls-ca", ca)
    lines = _own_lines(result.stderr)
    assert result.returncode == 1 and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith("rpcmesh services: TLS handshake failed:"), lines
    assert "certificate has expired" in lines[0], lines


def _client_flags(certs: Path, case: str) -> list[str]:
    if case == "plaintext client":
        return []
    if case == "unknown CA":
        return ["--tls-ca", str(certs / "other" / "ca.crt")]
    if case == "missing client certificate":
        return ["--tls-ca", str(certs / "ca.crt")]
    if case == "expired client certificate":
        cert, key = certs / "client-expired.crt", certs / "client-expired.key"
        return [
            "--tls-ca",
            str(certs / "ca.crt"),
            "--tls-client-cert",
            str(cert),
            "--tls-client-key",
            str(key),
        ]
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("plaintext client", "speaks TLS but this client dials plaintext"),
        ("unknown CA", "unknown CA"),
        ("missing client certificate", "requires a client certificate"),
        ("expired client certificate", "expired"),
    ],
)
def test_a_failed_tls_handshake_is_named(plane: Plane, case: str, reason: str) -> None:
    result = _run("services", "--target", plane.address, "--timeout", "5", *_client_flags(plane.certs, case))
    lines = _own_lines(result.stderr)
    assert result.returncode == 1 and len(lines) == 1, (case, result.returncode, result.stderr)
    assert lines[0].startswith("rpcmesh services: TLS handshake failed:"), (case, lines)
    assert reason in lines[0], (case, lines)


def test_the_right_certificate_still_works(plane: Plane) -> None:
    certs = plane.certs
    result = _run(
        "services", "--target", plane.address,
        "--tls-ca", str(certs / "ca.crt"),
        "--tls-client-cert", str(certs / "client-ops.crt"), "--tls-client-key", str(certs / "client-ops.key"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--tls-client-auth"], "--coordinator-cert"),
        (["--tls-client-auth", "--coordinator-cert", "{certs}/client-rpcmesh-coordinator.crt"],
         "--coordinator-key"),
        (["--token-secret-file", "{certs}/token.secret", "--no-ca"], "--tls-ca"),
        (["--coordinator-token-file", "{certs}/token.secret", "--tls-client-auth",
          "--coordinator-cert", "{certs}/client-rpcmesh-coordinator.crt",
          "--coordinator-key", "{certs}/client-rpcmesh-coordinator.key"], "--token-secret-file"),
    ],
)  # fmt: skip
def test_up_refuses_a_secure_mode_without_the_coordinators_identity(
    certs: Path, tmp_path: Path, flags: list[str], named: str
) -> None:
    (certs / "token.secret").write_text("s" * 40)
    args = [flag.format(certs=certs) for flag in flags if flag != "--no-ca"]
    base = ["--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key")]
    if "--no-ca" not in flags:
        base += ["--tls-ca", str(certs / "ca.crt")]
    result = _run("up", "--port", "0", "--data-dir", str(tmp_path / "data"), *base, *args)
    lines = _own_lines(result.stderr)
    assert result.returncode == 1 and len(lines) == 1, (
        flags,
        result.returncode,
        result.stderr,
        result.stdout,
    )
    assert lines[0].startswith("rpcmesh up: ") and named in lines[0], (flags, lines)
    assert "listening" not in result.stdout


SERVERS = {"up", "gateway"}  # servers: their own TLS flags; the gateway's client identity is env


def _help(*command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    return out.getvalue()


def _listed_commands(help_text: str) -> list[str]:
    """The (sub)command names a help text lists under its positional arguments."""
    listing = help_text.split("positional arguments:", 1)[-1].split("options:", 1)[0]
    return re.findall(r"^    ([a-z][a-z-]*)(?:\s|$)", listing, re.M)


def _client_commands() -> list[tuple[str, ...]]:
    """Every command that talks to the control plane (it takes --target), found through --help."""
    found: list[tuple[str, ...]] = []
    for name in _listed_commands(_help()):
        if name in SERVERS:
            continue
        text = _help(name)
        if "--target" in text:
            found.append((name,))
        elif "SUBCOMMAND" in text:
            found += [(name, sub) for sub in _listed_commands(text) if "--target" in _help(name, sub)]
    return found


def test_every_client_command_shows_its_tls_and_token_flags_in_help() -> None:
    commands = _client_commands()
    assert len(commands) >= 10, commands
    for name in commands:
        text = _help(*name)
        for flag, env in [
            ("--tls-ca", "RPCMESH_TLS_CA"),
            ("--tls-client-cert", "RPCMESH_TLS_CLIENT_CERT"),
            ("--tls-client-key", "RPCMESH_TLS_CLIENT_KEY"),
            ("--tls-server-name", "RPCMESH_TLS_SERVER_NAME"),
            ("--token", "RPCMESH_TOKEN"),
            ("--token-file", "RPCMESH_TOKEN_FILE"),
            ("--insecure", "RPCMESH_INSECURE"),
        ]:
            assert flag in text and env in text, (name, flag)


def test_an_unreadable_ca_file_is_one_usage_line(tmp_path: Path) -> None:
    result = _run("services", "--target", "127.0.0.1:1", "--tls-ca", str(tmp_path / "missing-ca.crt"))
    lines = _own_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith("rpcmesh services: ") and "cannot read" in lines[0], lines
