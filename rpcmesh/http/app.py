"""The control plane's HTTP application: the Connect API, the console's files and its info document.

Routes:

- ``POST /<package.Service>/<Method>``: the Connect protocol (and gRPC-Web) for every method
  of the served services, through :class:`connectrpc.server.ConnectASGIApplication`;
- ``GET /console/info.json``: what the console's overview shows (version, backends,
  authentication mode, the gRPC address);
- ``GET /...``: the console's static files (``rpcmesh/console/static``; ``/`` is ``index.html``).

Cross-site request forgery: a browser sends ``Origin`` with every cross-origin POST, so an
RPC request whose ``Origin`` is not this server's own origin is refused (403,
``permission_denied``) before any handler runs; so is one whose content type is not a
Connect, gRPC or gRPC-Web one, which an HTML form (``text/plain``,
``application/x-www-form-urlencoded``, ``multipart/form-data``) cannot send. Every response
carries ``X-Content-Type-Options: nosniff`` and ``X-Frame-Options: DENY``; the console's
files also a strict ``Content-Security-Policy`` (scripts from this origin only, no inline
script).
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, cast

from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.server import ConnectASGIApplication, Endpoint

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "STATIC_DIR",
    "ControlPlaneHttpApp",
    "RpcApplication",
    "csrf_refusal",
    "serve_lifespan",
    "until_disconnect",
]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

STATIC_DIR = Path(__file__).resolve().parent.parent / "console" / "static"
"""The console's files, shipped in the wheel."""

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]

_RPC_CONTENT_TYPES = frozenset(
    {
        "application/json",
        "application/proto",
        "application/connect+json",
        "application/connect+proto",
        "application/grpc",
        "application/grpc+proto",
        "application/grpc+json",
        "application/grpc-web",
        "application/grpc-web+proto",
        "application/grpc-web+json",
    }
)
"""Request content types an RPC accepts (Connect unary and streaming, gRPC, gRPC-Web)."""

_PLACEHOLDER = (
    b"<!doctype html><html><head><meta charset='utf-8'><title>rpcmesh</title></head>"
    b"<body><h1>rpcmesh</h1><p>The console's files are not installed; the HTTP API is at "
    b"<code>POST /&lt;package.Service&gt;/&lt;Method&gt;</code> (docs/http-api.md).</p></body></html>"
)

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".map": "application/json",
}


class RpcApplication(ConnectASGIApplication[Mapping[str, Endpoint[Any, Any]]]):
    """The Connect application over a fixed set of endpoints (``/package.Service/Method``)."""

    def __init__(self, endpoints: Mapping[str, Endpoint[Any, Any]], *, read_max_bytes: int) -> None:
        super().__init__(
            service=endpoints,
            endpoints=lambda service: cast(Any, service),
            read_max_bytes=read_max_bytes,
            # Canonical JSON: an unknown field is INVALID_ARGUMENT, not silently dropped.
            codecs=[google_protobuf_binary_codec(), google_protobuf_json_codec(ignore_unknown_fields=False)],
        )

    @property
    def path(self) -> str:
        """Mounted at the root: every endpoint's path is ``/package.Service/Method``."""
        return "/"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _own_origin(scope: Scope) -> str | None:
    host = _header(scope, b"host") or _header(scope, b":authority")
    if host is None:
        server = scope.get("server")
        if not server:
            return None
        host = f"{server[0]}:{server[1]}"
    return f"{scope.get('scheme', 'http')}://{host}".lower()


def csrf_refusal(scope: Scope) -> str | None:
    """Why this RPC request may not reach a handler (cross-site request forgery rules), or None."""
    origin = _header(scope, b"origin")
    if origin is not None and origin.strip().lower() != _own_origin(scope):
        return f"cross-origin request refused (Origin {origin.strip()!r} is not this server's)"
    content_type = (_header(scope, b"content-type") or "").partition(";")[0].strip().lower()
    if content_type not in _RPC_CONTENT_TYPES:
        return (
            f"content type {content_type or '(none)'!r} is not a Connect, gRPC or gRPC-Web one "
            "(send application/json, application/proto or application/connect+json)"
        )
    return None


def _with_security_headers(send: Send) -> Send:
    async def secured(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *_SECURITY_HEADERS]}
        await send(message)

    return secured


def _final(message: dict[str, Any]) -> bool:
    if message["type"] == "http.response.body":
        return not message.get("more_body", False)
    return message["type"] == "http.response.trailers" and not message.get("more_trailers", False)


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI lifespan's startup and shutdown (nothing to set up or tear down)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def until_disconnect(receive: Receive, send: Send) -> tuple[Receive, Send]:
    """``receive`` and ``send`` where the end of a response gives up once the client has gone.

    Hypercorn's HTTP/2 connection, once closed, never drains what the application still
    sends to end a stream (the end of a Watch a closed browser tab was reading): the
    request's task would wait until shutdown, and shutdown for its whole grace period. So the
    last send of a response races the client's disconnect, and sends after it do nothing.
    """
    gone = False

    async def receiving() -> dict[str, Any]:
        nonlocal gone
        message = await receive()
        if message["type"] == "http.disconnect":
            gone = True
        return message

    async def disconnected() -> None:
        while (await receiving())["type"] != "http.disconnect":
            pass

    async def sending(message: dict[str, Any]) -> None:
        if gone:
            return
        if not _final(message):
            await send(message)
            return
        sent = asyncio.ensure_future(send(message))
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({sent, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sent, watch):
                task.cancel()
            await asyncio.gather(sent, watch, return_exceptions=True)
        if not sent.cancelled() and sent.exception() is not None and not gone:
            raise cast(BaseException, sent.exception())

    return receiving, sending


async def _respond(
    send: Send, status: int, body: bytes, content_type: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, *(extra or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"code": code, "message": message}).encode()
    await _respond(send, status, body, "application/json")


class ControlPlaneHttpApp:
    """The ASGI application of the control plane's HTTP port.

    Args:
        endpoints: ``/package.Service/Method`` -> Connect endpoint.
        read_max_bytes: Largest request message (the gRPC port's receive limit).
        info: The document served at ``/console/info.json``.
        static_dir: The console's files.
    """

    def __init__(
        self,
        endpoints: Mapping[str, Endpoint[Any, Any]],
        *,
        read_max_bytes: int,
        info: Mapping[str, Any],
        static_dir: Path = STATIC_DIR,
    ) -> None:
        self._rpc = RpcApplication(endpoints, read_max_bytes=read_max_bytes)
        self._services = {path.split("/")[1] for path in endpoints}
        self._info = json.dumps(dict(info), indent=2).encode()
        self._static_dir = static_dir.resolve()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route one ASGI event."""
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        send = _with_security_headers(send)
        path: str = scope.get("path", "/")
        if path.count("/") == 2 and path.split("/")[1] in self._services:
            reason = csrf_refusal(scope)
            if reason is not None:
                await _refuse(send, 403, "permission_denied", reason)
                return
            receive, send = until_disconnect(receive, send)
            await self._rpc(scope, receive, send)
            return
        if scope.get("method") not in ("GET", "HEAD"):
            await _refuse(send, 404, "not_found", f"no RPC at {path}")
            return
        if path == "/console/info.json":
            await _respond(send, 200, self._info, "application/json", [(b"cache-control", b"no-store")])
            return
        await self._static(path, send)

    async def _static(self, path: str, send: Send) -> None:
        csp = [
            (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
            (b"cache-control", b"no-cache"),
        ]
        relative = path.lstrip("/") or "index.html"
        target = (self._static_dir / relative).resolve()
        inside = target.is_relative_to(self._static_dir) and ".." not in relative.split("/")
        if inside and target.is_dir():
            target = target / "index.html"
        if not inside or not target.is_file():
            if relative == "index.html":
                await _respond(send, 200, _PLACEHOLDER, "text/html; charset=utf-8", csp)
                return
            await _respond(send, 404, b"not found\n", "text/plain; charset=utf-8", csp)
            return
        body = await asyncio.to_thread(target.read_bytes)
        kind = _TYPES.get(target.suffix.lower()) or mimetypes.guess_type(target.name)[0]
        await _respond(send, 200, body, kind or "application/octet-stream", csp)
