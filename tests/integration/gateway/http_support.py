"""Helpers for the gateway's HTTP ingress tests: the example shop behind a real gateway, Connect framing.

A plain HTTP client (httpx) is the caller: Connect unary calls are ordinary POSTs of JSON;
server streams use the Connect streaming framing (a flag byte and a 4-byte length before
each message, and an end-of-stream message with flag 2), done here in a few lines so the
test depends on no Connect client.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import backends_required
from tests.support.processes import ROOT, ManagedProcess, start_control_plane, start_echo, start_gateway

# Users is read-only: its calls may be retried on another instance.
CALL_POLICY = """\
services:
  users:
    method: {idempotent: true, timeout: 5s, retry: {max_attempts: 4, initial_backoff: 20ms}}
    instance_breaker: {consecutive_failures: 2, open_duration: 30s}
"""
HTTP_LINE = r"HTTP \(Connect\) ingress at (\S+)"


@dataclass
class Shop:
    """A control plane, the shop's users (two instances) and orders, echo, and an open gateway."""

    registry: str
    tmp: Path
    url: str
    """The open gateway's HTTP base URL (``--route /api/users=users``)."""
    users: list[ManagedProcess]
    entry: ManagedProcess
    """The open gateway's process."""
    started: list[ManagedProcess] = field(default_factory=list)

    def gateway(self, *args: str) -> str:
        """Start another gateway with HTTP on; returns its HTTP base URL."""
        proc, _ = start_gateway(self.registry, "--http-port", "0", *args)
        self.started.append(proc)
        return proc.wait_for_line(HTTP_LINE).group(1)


def start_shop_service(registry: str, service: str, instance_id: str) -> ManagedProcess:
    """`examples/shop/run_service.py SERVICE`; waits until it serves."""
    script = ROOT / "examples" / "shop" / "run_service.py"
    proc = ManagedProcess(
        [
            sys.executable,
            str(script),
            service,
            "--registry",
            registry,
            "--instance-id",
            instance_id,
            "--ttl",
            "2",
        ]
    )
    try:
        proc.wait_for_address()
    except BaseException:
        proc.kill()
        raise
    return proc


def shop_mesh(tmp: Path) -> Iterator[Shop]:
    """The processes of :class:`Shop`, all killed at the end."""
    started: list[ManagedProcess] = []
    try:
        control_plane, registry = start_control_plane(tmp / "data")
        started.append(control_plane)
        users = [start_shop_service(registry, "users", f"users-{n}") for n in (1, 2)]
        started.extend(users)
        started.append(start_shop_service(registry, "orders", "orders-1"))
        started.append(start_echo(registry, "echo-1"))
        policy = tmp / "calls.yaml"
        policy.write_text(CALL_POLICY)
        gateway, _ = start_gateway(
            registry, "--http-port", "0", "--route", "/api/users=users", "--policy", str(policy)
        )
        started.append(gateway)
        url = gateway.wait_for_line(HTTP_LINE).group(1)
        yield Shop(registry, tmp, url, users, gateway, started)
    finally:
        for proc in started:
            proc.kill()


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    """One Connect streaming frame of a JSON message."""
    body = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(body)) + body


def read_frames(body: bytes) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, end-of-stream object) of a Connect streaming response body."""
    messages: list[dict[str, Any]] = []
    end: dict[str, Any] = {}
    offset = 0
    while offset < len(body):
        flags, size = struct.unpack(">BI", body[offset : offset + 5])
        payload = json.loads(body[offset + 5 : offset + 5 + size])
        offset += 5 + size
        if flags & 0x02:
            end = payload
        else:
            messages.append(payload)
    return messages, end


BUF = ["npx", "--yes", "@bufbuild/buf@1.75.0"]
"""buf, the version the Makefile pins (as tests/integration/http/test_buf_curl.py runs it)."""


def buf_or_skip() -> list[str]:
    """The buf command; skips with the reason when it cannot run (fails under RPCMESH_REQUIRE_BACKENDS=1)."""
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
