"""The gateway: one address through which any gRPC client reaches every mesh service.

``rpcmesh gateway`` accepts any method, maps its gRPC service to a registered
service name (:mod:`rpcmesh.gateway.routes`) and forwards the call through the
mesh client stack, so discovery, load balancing, retries, breakers and tracing
apply to callers that know nothing of rpcmesh.
"""

from rpcmesh.gateway.routes import RouteTable
from rpcmesh.gateway.server import Gateway, GatewayConfig

__all__ = ["Gateway", "GatewayConfig", "RouteTable"]
