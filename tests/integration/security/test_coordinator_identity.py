"""The saga coordinator inside `rpcmesh up` in token mode: its identity is a token the control plane
mints with its own secret (named by --coordinator-identity), or the one in --coordinator-token-file.

The example shop runs over TLS with bearer tokens; an order saga started from the CLI completes,
so the coordinator's Registry watch and its calls to the participants carry its token. The policy
gives the coordinator `discover` of the participants only (no "*"), as an operator may.
"""  # noqa: D205

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import ROOT, ManagedProcess, python_env, rpcmesh_command, start_control_plane

SERVICES = ("orders", "inventory", "payments")
POLICY = """\
admins: [ops]
identities:
  {coordinator}:
    services: []
    discover: [orders, inventory, payments]
  orders:
    publish: ["events.order.>"]
  inventory: {{}}
  payments: {{}}
"""


def _run(*args: str) -> str:
    done = subprocess.run(
        args, env=python_env(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout.strip()


def _token(certs: Path, subject: str) -> str:
    return _run(
        *rpcmesh_command("token", subject, "--secret-file", str(certs / "token.secret"), "--ttl", "600")
    )


@pytest.mark.parametrize("source", ["minted", "token-file"])
def test_a_token_mode_coordinator_runs_the_order_saga(tmp_path: Path, source: str) -> None:
    certs = tmp_path / "certs"
    _run(*rpcmesh_command("certs", str(certs), "--token-secret"))
    coordinator = "saga-runner"
    (tmp_path / "policy.yaml").write_text(POLICY.format(coordinator=coordinator))
    identity = ["--coordinator-identity", coordinator]
    if source == "token-file":
        (tmp_path / "coordinator.token").write_text(_token(certs, coordinator) + "\n")
        identity = ["--coordinator-token-file", str(tmp_path / "coordinator.token")]
    plane, address = start_control_plane(
        tmp_path / "data",
        "--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
        "--tls-ca", str(certs / "ca.crt"), "--token-secret-file", str(certs / "token.secret"),
        "--policy", str(tmp_path / "policy.yaml"), *identity,
    )  # fmt: skip
    services: list[ManagedProcess] = []
    try:
        for name in SERVICES:
            env = {
                "RPCMESH_TLS_CERT": str(certs / "server.crt"),
                "RPCMESH_TLS_KEY": str(certs / "server.key"),
                "RPCMESH_TLS_CA": str(certs / "ca.crt"),
                "RPCMESH_TOKEN_SECRET_FILE": str(certs / "token.secret"),
                "RPCMESH_TOKEN": _token(certs, name),
            }
            script = str(ROOT / "examples" / "shop" / "run_service.py")
            services.append(
                ManagedProcess([sys.executable, script, name, "--registry", address], env=python_env(env))
            )
        for service in services:
            service.wait_for_address()
        _run(sys.executable, str(ROOT / "examples" / "shop" / "place_order.py"), str(tmp_path / "shop"))
        done = subprocess.run(
            rpcmesh_command(
                "saga", "start", "--definition-file", str(tmp_path / "shop" / "place-order.json"),
                "--input-file", str(tmp_path / "shop" / "order.bin"), "--wait", "15",
                "--target", address, "--tls-ca", str(certs / "ca.crt"), "--token", _token(certs, "ops"),
            ),
            env=python_env(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0 and "COMPLETED" in done.stdout, (
            source, done.stdout, done.stderr, plane.output()[-3000:]
        )  # fmt: skip
    finally:
        for service in services:
            service.kill()
        plane.kill()
