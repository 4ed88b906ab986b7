"""The gRPC face of the Registry: validate, decide through the node, answer.

Handlers raise rpcmesh StatusErrors; the control plane's StatusErrorInterceptor
turns them into precise statuses with rich details.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import grpc.aio
from google.protobuf import timestamp_pb2

from rpcmesh.controlplane.registry import transitions, validation
from rpcmesh.controlplane.registry.address_policy import AddressPolicy
from rpcmesh.controlplane.registry.model import PUT, Event, new_id, new_token
from rpcmesh.controlplane.registry.node import RegistryNode
from rpcmesh.errors import OutOfRangeError, ResourceExhaustedError, StatusError, UnavailableError
from rpcmesh.security import ANONYMOUS, current_identity
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

_WATCH_BATCH = 1000
_CODE_OK = 0


def _status_value(error: StatusError) -> int:
    value: int = error.code.value[0]
    return value


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    """Implements rpcmesh.v1.Registry on a :class:`RegistryNode`."""

    def __init__(
        self,
        node: RegistryNode,
        *,
        max_leases_per_identity: int = 0,
        address_policy: AddressPolicy | None = None,
    ) -> None:
        self.node = node
        self.max_leases_per_identity = max_leases_per_identity
        """0: no cap (the control plane runs without authentication)."""
        self.address_policy = address_policy if address_policy is not None else node.settings.address_policy
        """Which addresses Register accepts (default: the node's settings)."""
        self._abandoned: set[asyncio.Task[int]] = set()
        self._owner_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        """One per capped identity registering now: its cap check and write go one at a time."""
        """Store questions given up on (timed out), kept referenced until their cancellation ends."""

    def _owner_turn(self) -> contextlib.AbstractAsyncContextManager[object]:
        """Held while the caller's lease cap is checked and the instance written.

        Registers arriving together otherwise all pass the check before any is written. This
        holds on one node; across nodes of a shared store the cap is counted on each node's view,
        so concurrent registrations through several nodes can pass it by a few.
        """
        identity = current_identity.get()
        if self.max_leases_per_identity <= 0 or identity is None or identity == ANONYMOUS:
            return contextlib.nullcontext()
        lock = self._owner_locks.get(identity.name)
        if lock is None:
            lock = self._owner_locks[identity.name] = asyncio.Lock()
        return lock

    def _claim_owner(self, declared: registry_pb2.Instance) -> None:
        """Record the caller as the owner of a new instance, within its lease cap (see _owner_turn)."""
        identity = current_identity.get()
        if identity is None or identity == ANONYMOUS:
            return
        declared.owner = identity.name
        if self.max_leases_per_identity <= 0:
            return
        if self.node.view.get(declared.service, declared.instance_id) is not None:
            return
        held = sum(1 for instance in self.node.view.instances() if instance.owner == identity.name)
        if held >= self.max_leases_per_identity:
            raise ResourceExhaustedError(
                f"identity {identity.name!r} holds {held} leases, the most it may hold; "
                "deregister instances or raise max_leases_per_identity"
            )

    async def Register(
        self, request: registry_pb2.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.RegisterResponse:
        """Create or (with the lease token) update an instance.

        A malformed address is INVALID_ARGUMENT; one the address policy refuses is
        PERMISSION_DENIED with an ``ErrorInfo`` (reason ``ADDRESS_NOT_ALLOWED``).
        """
        spec = validation.register_request(request)
        # Before anything is read or written: a refused address changes nothing.
        self.address_policy.check(spec.instance.address)
        declared = spec.instance
        if not declared.instance_id:
            declared.instance_id = new_id()
        async with self._owner_turn():
            self._claim_owner(declared)
            now = timestamp_pb2.Timestamp()
            now.GetCurrentTime()
            decide = partial(
                transitions.register,
                declared=declared,
                ttl_ms=spec.ttl_ms,
                lease_token=request.lease_token,
                fresh=transitions.Fresh(lease_id=new_id(), lease_token=new_token(), now=now),
            )
            # Returns once this node's view shows the write, so the next check counts it.
            committed = await self.node.mutate(declared.service, declared.instance_id, decide)
        result: transitions.Registered = committed.result
        return registry_pb2.RegisterResponse(
            instance_id=result.instance_id,
            lease_id=result.lease_id,
            lease_token=result.lease_token,
            ttl=transitions.ttl_duration(result.ttl_ms),
            revision=committed.revision,
        )

    async def Deregister(
        self, request: registry_pb2.DeregisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.DeregisterResponse:
        """Remove an instance (needs its lease token)."""
        service, instance_id = validation.instance_key(request.service, request.instance_id)
        decide = partial(
            transitions.deregister, service=service, instance_id=instance_id, lease_token=request.lease_token
        )
        committed = await self.node.mutate(service, instance_id, decide)
        return registry_pb2.DeregisterResponse(revision=committed.revision)

    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.HeartbeatResponse:
        """Renew one lease."""
        lease_id = validation.lease_id(request.lease_id)
        ttl_ms = await self.node.store.renew(lease_id, request.lease_token)
        return registry_pb2.HeartbeatResponse(lease_id=lease_id, ttl=transitions.ttl_duration(ttl_ms))

    async def KeepAlive(
        self,
        request_iterator: AsyncIterator[registry_pb2.KeepAliveRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[registry_pb2.KeepAliveResponse]:
        """Renew many leases over one stream; a failed renewal is reported, not fatal."""
        async for request in request_iterator:
            try:
                lease_id = validation.lease_id(request.lease_id)
                ttl_ms = await self.node.store.renew(lease_id, request.lease_token)
            except StatusError as error:
                yield registry_pb2.KeepAliveResponse(
                    lease_id=request.lease_id, code=_status_value(error), message=error.message
                )
                continue
            yield registry_pb2.KeepAliveResponse(
                lease_id=lease_id, ttl=transitions.ttl_duration(ttl_ms), code=_CODE_OK
            )

    async def ReportHealth(
        self, request: registry_pb2.ReportHealthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.ReportHealthResponse:
        """Record the status an instance reports about itself."""
        service, instance_id = validation.instance_key(request.service, request.instance_id)
        status = validation.serving_status(request.status)
        decide = partial(
            transitions.report_health,
            service=service,
            instance_id=instance_id,
            lease_token=request.lease_token,
            status=status,
        )
        committed = await self.node.mutate(service, instance_id, decide)
        return registry_pb2.ReportHealthResponse(health=committed.result, revision=committed.revision)

    async def Resolve(
        self, request: registry_pb2.ResolveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.ResolveResponse:
        """Instances of one service matching the filters (passing ones unless include_unhealthy)."""
        validation.resolve_request(request)
        view = self.node.view
        instances = view.resolve(
            request.service,
            tags=list(request.tags),
            zone=request.zone,
            version=request.version,
            metadata=dict(request.metadata),
            include_unhealthy=request.include_unhealthy,
        )
        return registry_pb2.ResolveResponse(instances=instances, revision=view.revision)

    async def ListServices(
        self, request: registry_pb2.ListServicesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.ListServicesResponse:
        """One page of services with instance counts."""
        size = validation.page_size(request.page_size)
        view = self.node.view
        services, next_token = view.list_services(size, request.page_token)
        return registry_pb2.ListServicesResponse(
            services=services, next_page_token=next_token, revision=view.revision
        )

    async def _check_reached(self, revision: int) -> None:
        """Make sure this node's view reached ``revision`` before resuming a watch after it.

        OUT_OF_RANGE only when the store itself never reached it: the registry lost its data, or
        it is not the registry the client watched. A node of a shared store that is merely late
        (it reads the log after the node the client saw the revision through: a stalled
        connection, a busy pool) gets a moment to catch up, then the caller gets UNAVAILABLE and
        retries, maybe on another node, from the same revision; answering OUT_OF_RANGE there
        would make it take a snapshot from the late view and lose what that view has not read.
        """
        node = self.node
        if revision <= node.view.revision:
            return
        if await self._caught_up_within(revision, 2 * node.settings.poll_interval):
            return
        timeout = node.settings.catch_up_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        stored = await self._stored_revision_within(timeout)
        if stored is None:
            raise UnavailableError(
                f"after_revision: {revision} is ahead of this registry node's view "
                f"(revision {node.view.revision}) and its store did not answer within {timeout:g}s; retry"
            )
        if revision > stored and revision > node.view.revision:
            raise OutOfRangeError(
                f"after_revision: {revision} is ahead of this registry's revision {stored} "
                "(it lost its data or is another registry); watch again from 0 for a snapshot"
            )
        remaining = deadline - asyncio.get_running_loop().time()
        if not await self._caught_up_within(revision, max(remaining, 0.0)):
            raise UnavailableError(
                f"after_revision: this registry node has not yet read revision {revision} from its store "
                f"(its view is at {node.view.revision}); retry, here or through another node"
            )

    async def _stored_revision_within(self, within: float) -> int | None:
        """The store's revision, or None when it does not answer within ``within`` seconds.

        The question is left behind, not awaited, when it times out: cancelling a query on a
        stalled connection can itself hang until the network gives up, and the bound is the point.
        """
        task = asyncio.ensure_future(self.node.store.stored_revision())
        try:
            done, _ = await asyncio.wait({task}, timeout=within)
        finally:
            if not task.done():
                task.cancel()
                self._abandoned.add(task)
                task.add_done_callback(self._forget)
        return task.result() if done else None

    def _forget(self, task: asyncio.Task[int]) -> None:
        """Done callback of an abandoned store question: drop it, retrieving its outcome."""
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()

    async def _caught_up_within(self, revision: int, within: float) -> bool:
        """Whether this node's view reaches ``revision`` within ``within`` seconds."""
        node = self.node
        if revision <= node.view.revision:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(node.caught_up(revision), within)
        return revision <= node.view.revision

    async def Watch(
        self, request: registry_pb2.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[registry_pb2.WatchResponse]:
        """A snapshot (or a resume from after_revision), then every change in revision order."""
        validation.watch_request(request)
        node = self.node
        # Subscribe and read the view in one step of the loop: nothing can slip in between.
        subscription = node.hub.subscribe(request.service)
        try:
            if request.after_revision == 0:
                revision = node.view.revision
                snapshot = [
                    Event(revision, PUT, instance).to_proto()
                    for instance in node.view.instances(request.service)
                ]
                yield registry_pb2.WatchResponse(events=snapshot, snapshot=True, revision=revision)
                delivered = revision
            else:
                delivered = request.after_revision
                await self._check_reached(delivered)
                upto = node.view.revision
                while delivered < upto:
                    history = await node.store.events_after(delivered, _WATCH_BATCH)
                    if not history:
                        break
                    delivered = history[-1].revision
                    matching = [
                        event.to_proto()
                        for event in history
                        if not request.service or event.instance.service == request.service
                    ]
                    if matching:
                        yield registry_pb2.WatchResponse(events=matching, revision=delivered)
            while True:
                batch = [
                    event
                    for event in await subscription.next_batch(_WATCH_BATCH)
                    if event.revision > delivered
                ]
                if not batch:
                    continue
                delivered = batch[-1].revision
                yield registry_pb2.WatchResponse(
                    events=[event.to_proto() for event in batch], revision=delivered
                )
        finally:
            subscription.unsubscribe()
