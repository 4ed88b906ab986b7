"""docs/security.md, end to end: the example shop in mTLS mode runs the order saga to COMPLETED.

The commands mirror the walkthrough in docs/security.md one for one (certs, policy, `rpcmesh up`
with the coordinator's certificate, the shop's services with their certificates, `rpcmesh saga
start --wait` with the CLI's TLS flags); only the port is 0 instead of 50051. The policy is read
from the document itself, so the test fails when the documented policy stops working.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.support.processes import ROOT, ManagedProcess, python_env, rpcmesh_command, start_control_plane

SERVICES = ("orders", "inventory", "payments")


def documented_policy() -> str:
    """The policy YAML of the walkthrough (the block after "cat > policy.yaml")."""
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    match = re.search(r"cat > policy\.yaml <<'EOF'\n(.*?)\nEOF\n", text, re.S)
    assert match, "docs/security.md: the policy.yaml block of the walkthrough is missing"
    return match.group(1) + "\n"


def test_shop_order_saga_completes_in_mtls_mode(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    identities = ["rpcmesh-coordinator", "ops", *SERVICES, "users", "notifications"]
    subprocess.run(
        rpcmesh_command("certs", str(certs), *[arg for name in identities for arg in ("--client", name)]),
        check=True,
        env=python_env(),
        capture_output=True,
        timeout=60,
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(documented_policy(), encoding="utf-8")
    # fmt: off
    plane, address = start_control_plane(
        tmp_path / "data",
        "--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
        "--tls-ca", str(certs / "ca.crt"), "--tls-client-auth", "--policy", str(policy),
        "--coordinator-cert", str(certs / "client-rpcmesh-coordinator.crt"),
        "--coordinator-key", str(certs / "client-rpcmesh-coordinator.key"),
    )
    # fmt: on
    services: list[ManagedProcess] = []
    try:
        shared = {
            "RPCMESH_TLS_CERT": str(certs / "server.crt"),
            "RPCMESH_TLS_KEY": str(certs / "server.key"),
            "RPCMESH_TLS_CA": str(certs / "ca.crt"),
            "RPCMESH_TLS_CLIENT_AUTH": "1",
        }
        for name in SERVICES:
            env = shared | {
                "RPCMESH_TLS_CLIENT_CERT": str(certs / f"client-{name}.crt"),
                "RPCMESH_TLS_CLIENT_KEY": str(certs / f"client-{name}.key"),
            }
            script = ROOT / "examples" / "shop" / "run_service.py"
            services.append(
                ManagedProcess(
                    [sys.executable, str(script), name, "--registry", address], env=python_env(env)
                )
            )
        for service in services:
            service.wait_for_address()
        shop = tmp_path / "shop"
        subprocess.run(
            [sys.executable, str(ROOT / "examples" / "shop" / "place_order.py"), str(shop)],
            check=True,
            env=python_env(),
            capture_output=True,
            timeout=60,
        )
        # fmt: off
        started = subprocess.run(
            rpcmesh_command(
                "saga", "start", "--definition-file", str(shop / "place-order.json"),
                "--input-file", str(shop / "order.bin"), "--wait", "15", "--target", address,
                "--tls-ca", str(certs / "ca.crt"),
                "--tls-client-cert", str(certs / "client-ops.crt"),
                "--tls-client-key", str(certs / "client-ops.key"),
            ),
            env=python_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # fmt: on
        assert started.returncode == 0 and "COMPLETED" in started.stdout, (
            f"saga start: {started.returncode}\n{started.stdout}\n{started.stderr}\n"
            f"plane:\n{plane.output()[-3000:]}"
        )
    finally:
        for service in services:
            service.kill()
        plane.kill()
