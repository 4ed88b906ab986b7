r"""HTTP/JSON access to the control plane: the Connect protocol for every rpcmesh.v1 RPC, and the console.

`rpcmesh up --http-port N` serves, next to the gRPC port, an HTTP/1.1 and HTTP/2 port (see
docs/http-api.md) where every method of Registry, Bus, SagaCoordinator, EventStore and
``grpc.health.v1.Health`` is callable with the Connect protocol (JSON or binary protobuf,
unary and streaming; gRPC-Web too), e.g.::

    curl -H 'Content-Type: application/json' -d '{"service": "users"}' \\
        http://127.0.0.1:8080/rpcmesh.v1.Registry/Resolve

Calls run the very handlers the gRPC server runs (captured at registration by
:class:`~rpcmesh.http.handlers.HandlerRecorder`), so authentication, authorization, limits,
validation and tracing are the gRPC port's. The console's static files are served at ``/``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rpcmesh.http.app import ControlPlaneHttpApp, csrf_refusal
from rpcmesh.http.handlers import HandlerRecorder
from rpcmesh.http.rpc import CommonNameLookup, build_endpoints
from rpcmesh.http.server import HttpServer

__all__ = [
    "ControlPlaneHttpApp",
    "HandlerRecorder",
    "HttpServer",
    "build_endpoints",
    "build_http_app",
    "console_info",
    "csrf_refusal",
]


def console_info(
    *, store: str | None, bus: str | None, grpc_address: str, token_auth: bool, certificate_auth: bool
) -> dict[str, Any]:
    """The ``/console/info.json`` document: version, backends, authentication mode, gRPC address."""
    from rpcmesh import __version__

    return {
        "version": __version__,
        "store": "postgresql" if store else "sqlite",
        "bus": "nats" if bus else "sqlite",
        "node_id": grpc_address,
        "address": grpc_address,
        "auth": "token" if token_auth else "mtls" if certificate_auth else "none",
        "grpc_address": grpc_address,
    }


def build_http_app(
    recorder: HandlerRecorder,
    service_names: Iterable[str],
    *,
    read_max_bytes: int,
    info: dict[str, Any],
    common_name_of: CommonNameLookup | None = None,
) -> ControlPlaneHttpApp:
    """The HTTP application serving ``service_names`` through the captured handlers."""
    if common_name_of is None:
        endpoints = build_endpoints(recorder, service_names)
    else:
        endpoints = build_endpoints(recorder, service_names, common_name_of=common_name_of)
    return ControlPlaneHttpApp(endpoints, read_max_bytes=read_max_bytes, info=info)
