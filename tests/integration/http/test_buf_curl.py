"""`buf curl --protocol connect`, a standard Connect client, calls the control plane's HTTP API.

Skipped with the reason when npx or buf cannot run (failed instead under
RPCMESH_REQUIRE_BACKENDS=1); buf is the version the Makefile pins.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading

import httpx
import pytest

from tests.integration.http.conftest import Plane
from tests.support.backends import backends_required
from tests.support.processes import ROOT

BUF = ["npx", "--yes", "@bufbuild/buf@1.75.0"]


@pytest.fixture(scope="module")
def buf() -> list[str]:
    reason = None
    if shutil.which("npx") is None:
        reason = "npx is not installed"
    else:
        try:
            probe = subprocess.run([*BUF, "--version"], capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            reason = "buf did not start within 180 s"
        else:
            if probe.returncode != 0:
                reason = f"buf cannot run: {probe.stderr.strip()[-300:]}"
    if reason is not None:
        if backends_required():
            pytest.fail(f"{reason} and RPCMESH_REQUIRE_BACKENDS=1")
        pytest.skip(f"{reason} (set RPCMESH_REQUIRE_BACKENDS=1 to fail instead)")
    return BUF


def _curl(buf: list[str], url: str, data: dict[str, object], *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *buf,
            "curl",
            "--protocol",
            "connect",
            "--schema",
            "protos",
            *flags,
            "--data",
            json.dumps(data),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_buf_curl_unary_calls_and_error_details(buf: list[str], plane: Plane) -> None:
    registered = httpx.post(
        f"{plane.url}/rpcmesh.v1.Registry/Register",
        json={
            "instance": {"service": "buf-users", "instanceId": "b1", "address": "127.0.0.1:9"},
            "ttl": "60s",
        },
        timeout=20,
    )
    assert registered.status_code == 200, registered.text
    resolved = _curl(buf, f"{plane.url}/rpcmesh.v1.Registry/Resolve", {"service": "buf-users"})
    assert resolved.returncode == 0, resolved.stderr
    assert [item["instanceId"] for item in json.loads(resolved.stdout)["instances"]] == ["b1"]

    wrong = _curl(
        buf,
        f"{plane.url}/rpcmesh.v1.EventStore/AppendToStream",
        {"stream": "order-buf", "expectedRevision": "4", "events": [{"eventType": "A"}]},
    )
    assert wrong.returncode != 0
    error = json.loads(wrong.stderr)
    assert error["code"] == "failed_precondition"
    assert [detail["type"] for detail in error["details"]] == ["rpcmesh.v1.WrongExpectedVersion"]


def test_buf_curl_server_stream_over_http2(buf: list[str], plane: Plane) -> None:
    # Watch never ends by itself: read buf's output until the snapshot has arrived, then stop it.
    command = [
        *buf,
        "curl",
        "--protocol",
        "connect",
        "--schema",
        "protos",
        "--http2-prior-knowledge",
        "--data",
        json.dumps({"service": "buf-watched"}),
        f"{plane.url}/rpcmesh.v1.Registry/Watch",
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,  # npx runs buf as its child: stop them both
    )

    def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    killer = threading.Timer(120, stop)
    killer.start()
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line)
            if line.rstrip() == "}":
                break
        assert lines, proc.stderr.read() if proc.stderr else ""
        assert json.loads("".join(lines))["snapshot"] is True
    finally:
        killer.cancel()
        stop()
        proc.communicate(timeout=30)
