"""Shutdown with HTTP streams open: they end at once with ``unavailable``, and `rpcmesh up` exits."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.controlplane.server import ControlPlane
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


async def test_streams_of_a_closed_http2_connection_do_not_hold_shutdown(tmp_path: Path) -> None:
    # A browser tab closed while watching: the connection goes away under open streams. Their
    # requests must end then, not wait for shutdown (which would then take the whole grace).
    plane = ControlPlane(ControlPlaneConfig(port=0, http_port=0, data_dir=tmp_path / "data", grace=30))
    await plane.start()
    try:
        async with httpx.AsyncClient(base_url=plane.http_url, http1=False, http2=True, timeout=30) as client:
            for _ in range(3):
                async with client.stream(
                    "POST",
                    "/rpcmesh.v1.Registry/Watch",
                    headers=STREAM_JSON,
                    content=envelope({"service": "http-closed"}),
                ) as response:
                    assert response.http_version == "HTTP/2"
                    async with asyncio.timeout(20):
                        await anext(envelopes(response))
    finally:
        async with asyncio.timeout(15):
            await plane.stop()
