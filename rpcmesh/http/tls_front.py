"""mTLS for the HTTP port: terminate TLS here, so the handlers learn the client certificate's name.

ASGI servers do not hand the verified client certificate to the application, yet with
``--tls-client-auth`` the certificate's common name *is* the caller's identity (as on the
gRPC port). So with client authentication the public port is this TLS front: it requires a
certificate signed by the control plane's CA, negotiates ``h2``/``http/1.1`` by ALPN, and
relays each connection's bytes to the HTTP server listening on a loopback port. It opens one
loopback connection per client connection and remembers that connection's local
``host:port`` -> the certificate's common name (:meth:`TlsFront.common_name_of`), which is the
client address the HTTP server reports for every request on it. A process that connects to
the loopback port directly has no entry, so it is not any certificate's identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any

from rpcmesh.security.tls import ServerTlsConfig

__all__ = ["TlsFront", "server_context"]

logger = logging.getLogger(__name__)

_CHUNK = 64 * 1024


def server_context(tls: ServerTlsConfig) -> ssl.SSLContext:
    """The TLS context of the HTTP port: the control plane's certificate, client certificates required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(tls.ca_file)
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def _common_name(certificate: Any) -> str | None:
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError, ssl.SSLError):
        pass


class TlsFront:
    """Accepts mTLS connections on ``sock`` and relays them to ``127.0.0.1:backend_port``."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, backend_port: int) -> None:
        self._sock = sock
        self._context = context
        self._backend_port = backend_port
        self._names: dict[str, str] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def common_name_of(self, client_address: str | None) -> str | None:
        """The certificate name of the client whose relayed connection comes from ``client_address``."""
        return self._names.get(client_address or "")

    async def start(self) -> None:
        """Listen."""
        self._server = await asyncio.start_server(
            self._relay, sock=self._sock, ssl=self._context, ssl_handshake_timeout=10.0
        )

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        key = ""
        backend: asyncio.StreamWriter | None = None
        try:
            name = _common_name(writer.get_extra_info("peercert"))
            backend_reader, backend = await asyncio.open_connection("127.0.0.1", self._backend_port)
            host, port = backend.get_extra_info("sockname")[:2]
            key = f"{host}:{port}"
            if name:
                self._names[key] = name
            await asyncio.gather(_pipe(reader, backend), _pipe(backend_reader, writer))
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            logger.debug("HTTP TLS connection ended: %s", exc)
        finally:
            self._names.pop(key, None)
            for stream in (backend, writer):
                if stream is not None:
                    stream.close()
                    with contextlib.suppress(Exception):
                        await stream.wait_closed()
            self._connections.discard(task)

    def close(self) -> None:
        """Stop accepting connections."""
        server, self._server = self._server, None
        if server is not None:
            server.close()

    async def stop(self) -> None:
        """Stop accepting, and end the relayed connections (the HTTP server has ended its requests)."""
        self.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=2.0)
