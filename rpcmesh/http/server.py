"""Serve the control plane's HTTP application with Hypercorn: HTTP/1.1 and HTTP/2, plaintext or TLS.

Plaintext ports speak HTTP/1.1 and HTTP/2 with prior knowledge (h2c); TLS ports negotiate
``h2`` or ``http/1.1`` by ALPN, with the control plane's certificate and key, and require a
client certificate signed by its CA when the gRPC port does (``--tls-client-auth``); then a
:class:`~rpcmesh.http.tls_front.TlsFront` terminates TLS so the certificate's name reaches the
handlers as on the gRPC port. The socket is bound here (so port 0 is resolved before serving
and a busy port fails the start with one line) and handed to Hypercorn as ``fd://``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

from rpcmesh.controlplane.component import StartupError
from rpcmesh.http.tls_front import TlsFront, server_context
from rpcmesh.security.tls import ServerTlsConfig

__all__ = ["HttpServer"]

logger = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        # Listening now: the URL is printed before Hypercorn's task has started its server, and
        # a client connecting then must be queued, not refused.
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """One Hypercorn server for an ASGI application, started and stopped with the control plane.

    Args:
        host: Interface to listen on.
        port: Port; 0 picks a free one.
        tls: The control plane's TLS settings (None: plaintext).
        graceful_timeout: Seconds in-flight requests get on shutdown.
        port_fallback: When ``port`` is taken, listen on a free port instead of failing.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls: ServerTlsConfig | None,
        graceful_timeout: float,
        port_fallback: bool = False,
    ) -> None:
        self._port_fallback = port_fallback
        self._host = host
        self._port = port
        self._tls = tls
        self._graceful_timeout = graceful_timeout
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._front: TlsFront | None = None
        self.url = ""
        """``http(s)://host:port`` once started."""

    def _listen(self) -> socket.socket:
        port = self._port
        try:
            try:
                return _bind(self._host, port)
            except OSError as exc:
                if not (self._port_fallback and exc.errno == errno.EADDRINUSE):
                    raise
                logger.warning("HTTP port %d is in use; serving HTTP on a free port", port)
                port = 0
                return _bind(self._host, port)
        except OSError as exc:
            raise StartupError(f"cannot listen on {self._host}:{port} (HTTP): {exc.strerror or exc}") from exc

    def common_name_of(self, client_address: str | None) -> str | None:
        """The verified client certificate's name of the connection a request came on (mTLS only)."""
        return self._front.common_name_of(client_address) if self._front is not None else None

    async def start(self, app: Any) -> str:
        """Bind and serve ``app`` in the background; returns the URL. StartupError if the port is taken."""
        sock = self._listen()
        port = sock.getsockname()[1]
        tls = self._tls
        if tls is not None and tls.client_auth:
            try:
                context = server_context(tls)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise StartupError(f"cannot use the TLS files for HTTP: {exc}") from exc
            backend = _bind("127.0.0.1", 0)
            self._front = TlsFront(sock, context, backend.getsockname()[1])
            sock, tls = backend, None
        config = Config()
        config.bind = [f"fd://{sock.detach()}"]
        config.graceful_timeout = self._graceful_timeout
        config.accesslog = None
        config.errorlog = logging.getLogger("rpcmesh.http.hypercorn")
        config.include_server_header = False
        config.keep_alive_timeout = 75.0
        # Large enough for the biggest request the RPC layer accepts (it answers RESOURCE_EXHAUSTED).
        config.h11_max_incomplete_size = 64 * 1024
        if tls is not None:
            config.certfile = str(tls.cert_file)
            config.keyfile = str(tls.key_file)
        scheme = "https" if self._tls is not None else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.url = f"{scheme}://{host}:{port}"
        self._task = asyncio.create_task(self._serve(app, config), name="rpcmesh-http")
        if self._front is not None:
            await self._front.start()
        return self.url

    async def _serve(self, app: Any, config: Config) -> None:
        try:
            await serve(app, config, shutdown_trigger=self._stop.wait, mode="asgi")
        except Exception:
            logger.exception("the HTTP server failed")

    def begin_stop(self) -> None:
        """Stop accepting requests; in-flight ones get ``graceful_timeout`` to finish."""
        self._stop.set()

    async def stop(self) -> None:
        """Stop and wait (at most ``graceful_timeout`` + 1 s); idempotent."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        if self._front is not None:
            self._front.close()
        done, _ = await asyncio.wait({task}, timeout=self._graceful_timeout + 1.0)
        if not done:
            logger.warning(
                "the HTTP server is still stopping after %.1fs; cancelling it", self._graceful_timeout
            )
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._front is not None:
            await self._front.stop()
