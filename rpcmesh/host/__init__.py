"""The service host: serve servicers with health and reflection, registered with the Registry."""

from rpcmesh.host.config import ServiceHostConfig
from rpcmesh.host.interceptors import CallContextInterceptor
from rpcmesh.host.lease import LeaseKeeper, LeaseLostError
from rpcmesh.host.service_host import ServiceHost

__all__ = ["CallContextInterceptor", "LeaseKeeper", "LeaseLostError", "ServiceHost", "ServiceHostConfig"]
