"""The examples run: `make demo` end to end, and the Node.js client as a full member of the mesh."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import ROOT, ManagedProcess, python_env, start_echo, start_gateway

NODE_DIR = ROOT / "examples" / "node"


RUN_MARKER = "RPCMESH_TEST_RUN"


def leftover_processes(run: str) -> list[str]:
    """Processes still alive that inherited ``RPCMESH_TEST_RUN=run`` (this run's, whoever reparented them).

    Scoped by environment rather than by command line: the other pytest-xdist worker, or another checkout,
    may run the same programs at the same time.
    """
    needle = f"{RUN_MARKER}={run}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name} {command}")
        except OSError:  # gone, or not ours to read
            continue
    return found


@pytest.mark.slow
def test_make_demo_tells_the_whole_story_and_leaves_nothing_behind() -> None:
    run = uuid.uuid4().hex
    result = subprocess.run(
        ["make", "-s", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**python_env(), RUN_MARKER: run},
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "saga COMPLETED" in out and "ORDER_STATE_CONFIRMED" in out
    assert "saga COMPENSATED" in out and "card declined" in out and "ORDER_STATE_CANCELLED" in out
    assert "(users-1 killed with -9)" in out and ", 0 failed" in out
    assert "is confirmed" in out and "is cancelled" in out
    tree = out[out.index("5. The trace of Alice's order") :]
    assert "shop-client    INTERNAL place order" in tree
    for span in ("SagaCoordinator/StartSaga", "shop.v1.Inventory/ReserveStock", "shop.v1.Payments/Charge"):
        assert span in tree
    assert "not every service's spans arrived" not in tree
    assert "demo finished" in out
    assert leftover_processes(run) == []


@pytest.fixture
def node_modules() -> Iterator[None]:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the Node.js example")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)
    yield


@pytest.mark.slow
def test_node_client_registers_uses_bus_and_sagas_and_calls_python_through_the_gateway(
    node_modules: None, control_plane: tuple[ManagedProcess, str]
) -> None:
    _, registry = control_plane
    echo = start_echo(registry, "py-echo-1")
    gateway, gateway_address = start_gateway(registry)
    try:
        result = subprocess.run(
            ["node", "mesh_client.js", "--target", registry, "--gateway", gateway_address],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        gateway.kill()
        echo.kill()
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "node: registered echo-node/" in out
    assert "node: resolved echo-node: 127.0.0.1:" in out
    assert 'node: bus received {"hello":"from node"} with x-correlation-id node-' in out
    assert "ended SAGA_STATE_COMPLETED" in out
    assert 'node: gateway answered "hello from node" from python instance py-echo-1' in out
    assert out.rstrip().endswith("node: done")
