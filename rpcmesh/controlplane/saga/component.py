"""SagaCoordinator as a control-plane component, on the same process's EventStore storage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import grpc.aio

from rpcmesh.client.policy import MeshPolicy
from rpcmesh.controlplane.component import ControlPlaneContext, StartupError
from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.controlplane.eventstore.component import EventStoreComponent
from rpcmesh.controlplane.saga.engine import SagaEngine
from rpcmesh.controlplane.saga.invoker import MeshStepInvoker, StepInvoker, check_coordinator_policy
from rpcmesh.controlplane.saga.security import coordinator_client_security
from rpcmesh.controlplane.saga.servicer import SagaCoordinatorServicer
from rpcmesh.security.client import ClientSecurity, aio_channel
from rpcmesh.tasks import stop_tasks
from rpcmesh.telemetry import Telemetry
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc, saga_pb2, saga_pb2_grpc

if TYPE_CHECKING:
    from rpcmesh.controlplane.saga.ownership import SagaOwnership

logger = logging.getLogger(__name__)


class SagaCoordinatorComponent:
    """Serves rpcmesh.v1.SagaCoordinator; resumes unfinished sagas once the Registry answers.

    On SQLite this node drives every saga. On a PostgreSQL store (``config.store``)
    several nodes may share the sagas: each mirrors the store and serves every RPC,
    and the one holding the store's saga lock drives them (:mod:`.ownership`).

    Args:
        config: The control plane's configuration.
        eventstore: The EventStore component whose storage holds the sagas.
        invoker: How steps are called; default a :class:`MeshStepInvoker` whose
            Mesh discovers participants from this control plane's own Registry.
        mesh_policy: Policy of that default invoker's Mesh (see
            :func:`~rpcmesh.controlplane.saga.invoker.check_coordinator_policy`).
        client_security: How the coordinator reaches its Registry and the participants;
            None: :func:`~rpcmesh.controlplane.saga.security.coordinator_client_security`
            from ``config`` and the environment, decided at start.
        telemetry: Where step spans and saga metrics go; None follows ``get_telemetry()``.
        ownership_options: Keyword arguments of :class:`SagaOwnership` (on a PostgreSQL
            store only: one node drives the sagas, every node serves).
    """

    def __init__(
        self,
        config: ControlPlaneConfig,
        *,
        eventstore: EventStoreComponent,
        invoker: StepInvoker | None = None,
        mesh_policy: MeshPolicy | None = None,
        client_security: ClientSecurity | None = None,
        telemetry: Telemetry | None = None,
        ownership_options: Mapping[str, float] | None = None,
    ) -> None:
        if mesh_policy is not None:
            check_coordinator_policy(mesh_policy)
        self.config = config
        self.eventstore = eventstore
        self._invoker = invoker
        self._mesh_policy = mesh_policy
        self._client_security = client_security
        self._telemetry = telemetry
        self._servicer = SagaCoordinatorServicer()
        self.engine: SagaEngine | None = None
        self._resume_task: asyncio.Task[None] | None = None
        self._ownership_options = dict(ownership_options or {})
        self.ownership: SagaOwnership | None = None

    @property
    def service_names(self) -> Sequence[str]:
        """rpcmesh.v1.SagaCoordinator."""
        return [saga_pb2.DESCRIPTOR.services_by_name["SagaCoordinator"].full_name]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the servicer."""
        saga_pb2_grpc.add_SagaCoordinatorServicer_to_server(self._servicer, server)

    async def start(self, context: ControlPlaneContext) -> None:
        """Load definitions and sagas; resume the unfinished ones in the background."""
        await self.eventstore.ensure_open()
        security = self._client_security
        if security is None:
            try:
                decided = coordinator_client_security(self.config)
            except ValueError as exc:
                raise StartupError(str(exc)) from exc
            for line in decided.warnings:
                logger.warning("%s", line)
            security = decided.security
        invoker = self._invoker or MeshStepInvoker(
            context.address, policy=self._mesh_policy, security=security, telemetry=self._telemetry
        )
        self.engine = SagaEngine(self.eventstore.storage, invoker, telemetry=self._telemetry)
        head = 0
        if self.config.store is not None:
            # Several nodes may share the store: mirror it, drive only while holding its lock.
            from rpcmesh.controlplane.saga.ownership import SagaOwnership  # psycopg: PostgreSQL only

            self.ownership = SagaOwnership(self.engine, self.config.store, **self._ownership_options)
            head = await self.eventstore.storage.head()
        await self.engine.start()
        if self.ownership is not None:
            self.ownership.follow(head + 1)  # re-reads what start() loaded past head: applied once
            self._servicer.nudge = self.ownership.nudge
        self._servicer.engine = self.engine
        self._resume_task = asyncio.create_task(self._resume(context.address, security), name="saga-resume")

    async def _resume(self, address: str, security: ClientSecurity) -> None:
        # Components start before the server accepts calls; a resumed step must
        # not burn its attempts on a Registry that is not serving yet.
        async with aio_channel(address, security) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            for _ in range(300):
                try:
                    await stub.ListServices(registry_pb2.ListServicesRequest(page_size=1), timeout=1.0)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        # The Registry answers (a refusal is an answer): resume now; a coordinator
                        # identity without `discover` in the policy shows in the steps' errors.
                        logger.warning("saga coordinator: ListServices answered %s", exc.code().name)
                        break
                    await asyncio.sleep(0.1)
        assert self.engine is not None
        if self.ownership is not None:
            self.ownership.contend()
        else:
            self.engine.resume_all()

    async def stop(self) -> None:
        """Stop the runners (the EventStore component closes the storage)."""
        if self.ownership is not None:
            await self.ownership.stop()
        if self._resume_task is not None:
            await stop_tasks([self._resume_task])
        if self.engine is not None:
            await self.engine.stop()
