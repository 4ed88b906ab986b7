"""The service host: serve servicers with health and reflection, registered with the Registry."""

from rpcmesh.controlplane.component import StartupError
from rpcmesh.host.config import HOST_LIMITS, ServiceHostConfig, host_security_from_env
from rpcmesh.host.interceptors import CallContextInterceptor
from rpcmesh.host.lease import LeaseKeeper, LeaseLostError
from rpcmesh.host.service_host import ServiceHost

__all__ = [
    "HOST_LIMITS",
    "CallContextInterceptor",
    "LeaseKeeper",
    "LeaseLostError",
    "ServiceHost",
    "ServiceHostConfig",
    "StartupError",
    "host_security_from_env",
]
