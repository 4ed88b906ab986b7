"""Fixtures of the HTTP API suite: `rpcmesh up --http-port 0` and a Connect client built on httpx."""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.processes import ManagedProcess, start_control_plane

HTTP_URL = re.compile(r"HTTP API and console at (https?://\S+?)/?$", re.MULTILINE)

JSON = {"Content-Type": "application/json"}
STREAM_JSON = {"Content-Type": "application/connect+json"}


@dataclass(frozen=True)
class Plane:
    """A running `rpcmesh up`: its process, gRPC address and HTTP base URL."""

    proc: ManagedProcess
    grpc_address: str
    url: str


def start_plane(data_dir: Path, *extra: str) -> Plane:
    """`rpcmesh up --port 0 --http-port 0 ...`, once its HTTP URL is printed."""
    proc, address = start_control_plane(data_dir, "--http-port", "0", *extra)
    try:
        url = proc.wait_for_line(HTTP_URL).group(1)
    except BaseException:
        proc.kill()
        raise
    return Plane(proc, address, url)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    """An open (development) control plane with its HTTP port."""
    running = start_plane(tmp_path_factory.mktemp("http-plane") / "data")
    try:
        yield running
    finally:
        running.proc.terminate()


def envelope(message: dict[str, Any]) -> bytes:
    """One Connect streaming envelope (flags 0) holding ``message`` as JSON."""
    body = json.dumps(message).encode()
    return struct.pack(">BI", 0, len(body)) + body


async def envelopes(response: httpx.Response) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """(flags, JSON) of each envelope of a Connect streaming response, as they arrive."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        while len(buffer) >= 5:
            flags, size = struct.unpack(">BI", buffer[:5])
            if len(buffer) < 5 + size:
                break
            yield flags, json.loads(buffer[5 : 5 + size])
            buffer = buffer[5 + size :]


def detail_types(error: dict[str, Any]) -> list[str]:
    """The ``type`` of each detail of a Connect error JSON."""
    return [detail["type"] for detail in error.get("details", [])]


def detail_bytes(error: dict[str, Any], type_name: str) -> bytes:
    """The serialized detail of type ``type_name`` (Connect sends unpadded base64)."""
    for detail in error.get("details", []):
        if detail["type"] == type_name:
            value: str = detail["value"]
            return base64.b64decode(value + "=" * (-len(value) % 4))
    raise AssertionError(f"no {type_name} detail in {error}")
