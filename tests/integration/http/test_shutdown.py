"""Shutdown with an HTTP stream open: it ends at once with ``unavailable``, and `rpcmesh up` exits."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from tests.integration.http.conftest import STREAM_JSON, envelope, envelopes, start_plane


async def test_open_http_stream_ends_with_unavailable_on_shutdown(tmp_path: Path) -> None:
    plane = start_plane(tmp_path / "data", "--grace", "30")
    try:
        async with (
            httpx.AsyncClient(base_url=plane.url, timeout=30) as client,
            client.stream(
                "POST",
                "/rpcmesh.v1.Registry/Watch",
                headers=STREAM_JSON,
                content=envelope({"service": "http-shutdown"}),
            ) as response,
        ):
            messages = envelopes(response)
            async with asyncio.timeout(20):
                flags, snapshot = await anext(messages)
                assert flags == 0 and snapshot["snapshot"] is True
                started = time.monotonic()
                await asyncio.to_thread(plane.proc.signal, 15)
                flags, end = await anext(messages)
            assert flags == 2, end
            assert end["error"]["code"] == "unavailable"
            # Ended by the stream tracker, not by the 30 s grace period running out.
            assert time.monotonic() - started < 15
        assert await asyncio.to_thread(plane.proc.proc.wait, 20) == 0
    finally:
        plane.proc.kill()
