"""The gateway: one address through which any gRPC client reaches every mesh service.

``rpcmesh gateway`` accepts any method, maps its gRPC service to a registered
service name (:mod:`rpcmesh.gateway.routes`) and forwards the call through the
mesh client stack, so discovery, load balancing, retries, breakers and tracing
apply to callers that know nothing of rpcmesh.

With authentication on, each call is authorized per caller identity and
resolved target (:mod:`rpcmesh.gateway.access`): the identity's ``calls`` in
the access policy (control-plane policy format) must cover
``<service>/<Method>``; admins may call everything. With no access policy every
call is refused unless ``allow_any_identity`` is set.

With ``GatewayConfig.http_port`` the gateway also serves every registered service over
HTTP/JSON, the Connect protocol (:mod:`rpcmesh.gateway.http_ingress`; path routes:
:class:`HttpRoutes`), through the same routing, authorization and mesh stack.
"""

from rpcmesh.gateway.access import GatewayAccess
from rpcmesh.gateway.routes import HttpRoutes, RouteTable
from rpcmesh.gateway.server import Gateway, GatewayConfig

__all__ = ["Gateway", "GatewayAccess", "GatewayConfig", "HttpRoutes", "RouteTable"]
