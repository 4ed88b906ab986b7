"""A secure `rpcmesh up` killed with -9 mid-saga resumes its unfinished sagas as soon as it serves again,
even when the coordinator's policy entry does not allow ListServices (discover without "*").

The coordinator waits for its own Registry before resuming; a refusal (PERMISSION_DENIED) is an
answer, so it must not be retried like UNAVAILABLE for half a minute. Each seeded trial starts a
saga whose only step calls `inventory`, which is not running yet (the step retries), kills the
control plane at a random moment, restarts it on the same port and data folder, then starts
`inventory`: the saga completes well within the wait.
"""  # noqa: D205

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import ROOT, ManagedProcess, python_env, rpcmesh_command, start_control_plane

POLICY = """\
admins: [ops]
identities:
  rpcmesh-coordinator:
    services: []
    discover: [inventory]
  inventory: {}
"""
DEFINITION = {
    "name": "reserve",
    "steps": [
        {
            "name": "reserve-stock",
            "service": "inventory",
            "method": "/shop.v1.Inventory/ReserveStock",
            "noCompensation": True,
            "request": {"baseFrom": "input"},
            "timeout": "2s",
            "retry": {"maxAttempts": 100, "initialBackoff": "0.2s", "maxBackoff": "0.5s"},
        }
    ],
}
SEEDS = (11, 12)


def _cli(certs: Path, address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        rpcmesh_command(
            *args, "--target", address, "--tls-ca", str(certs / "ca.crt"),
            "--tls-client-cert", str(certs / "client-ops.crt"),
            "--tls-client-key", str(certs / "client-ops.key"),
        ),
        env=python_env(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.fault
def test_a_secure_plane_resumes_its_sagas_at_once_after_kill_9(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run(
        rpcmesh_command(
            "certs", str(certs), "--client", "rpcmesh-coordinator", "--client", "ops", "--client", "inventory"
        ),
        env=python_env(), check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "reserve.json").write_text(json.dumps(DEFINITION))
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "shop" / "place_order.py"), str(tmp_path / "shop")],
        env=python_env(), check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    plane_args = [
        "--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
        "--tls-ca", str(certs / "ca.crt"), "--tls-client-auth", "--policy", str(tmp_path / "policy.yaml"),
        "--coordinator-cert", str(certs / "client-rpcmesh-coordinator.crt"),
        "--coordinator-key", str(certs / "client-rpcmesh-coordinator.key"),
    ]  # fmt: skip
    host_env = {
        "RPCMESH_TLS_CERT": str(certs / "server.crt"),
        "RPCMESH_TLS_KEY": str(certs / "server.key"),
        "RPCMESH_TLS_CA": str(certs / "ca.crt"),
        "RPCMESH_TLS_CLIENT_AUTH": "1",
        "RPCMESH_TLS_CLIENT_CERT": str(certs / "client-inventory.crt"),
        "RPCMESH_TLS_CLIENT_KEY": str(certs / "client-inventory.key"),
    }
    for seed in SEEDS:
        rng = random.Random(seed)
        kill_after = rng.uniform(0.0, 1.0)
        data = tmp_path / f"data-{seed}"
        plane, address = start_control_plane(data, *plane_args)
        inventory: ManagedProcess | None = None
        try:
            started = _cli(
                certs, address, "saga", "start", "--definition-file", str(tmp_path / "reserve.json"),
                "--input-file", str(tmp_path / "shop" / "order.bin"),
            )  # fmt: skip
            assert started.returncode == 0, (seed, started.stderr)
            saga_id = started.stdout.split()[0]
            time.sleep(kill_after)
            plane.kill()
            port = int(address.rpartition(":")[2])
            plane, address = start_control_plane(data, *plane_args, port=port)
            script = str(ROOT / "examples" / "shop" / "run_service.py")
            inventory = ManagedProcess(
                [sys.executable, script, "inventory", "--registry", address], env=python_env(host_env)
            )
            inventory.wait_for_address()
            status = _cli(certs, address, "saga", "status", saga_id, "--wait", "15")
            assert status.returncode == 0 and "COMPLETED" in status.stdout, (
                f"seed={seed} kill_after={kill_after:.3f}s",
                status.stdout, status.stderr, plane.output()[-2000:],
            )  # fmt: skip
        finally:
            if inventory is not None:
                inventory.kill()
            plane.kill()
