"""The Registry: service discovery with leases, health checks, watch and durable state.

Layout: :mod:`.validation`, :mod:`.address_policy`, :mod:`.transitions`, :mod:`.leases`, :mod:`.damping`
and :mod:`.view` are pure decision logic; :mod:`.store` is the storage
interface with SQLite (:mod:`.sqlite_store`) and PostgreSQL
(:mod:`.postgres_store`) implementations; :mod:`.node` ties store, view and
watchers together; :mod:`.servicer` is the gRPC face and :mod:`.component`
plugs it into `rpcmesh up`.
"""

from rpcmesh.controlplane.registry.address_policy import AddressPolicy
from rpcmesh.controlplane.registry.component import RegistryComponent
from rpcmesh.controlplane.registry.settings import RegistrySettings

__all__ = ["AddressPolicy", "RegistryComponent", "RegistrySettings"]
