"""Active grpc.health.v1 probes of the instances that ask for them, with flap damping.

One task per probed instance calls ``grpc.health.v1.Health/Check`` every
interval with the configured timeout; results go through the pure damper
(:mod:`.damping`) and only a change of the damped verdict is written, as a
HEALTH event. Probes never run commands. With PostgreSQL only the expiry
leader probes (checked every ``leadership_check_interval``), so nodes never
write verdicts from dampers of their own that disagree; a new leader starts each
damper from the health the instance has. Every probe task is supervised.

An instance whose address the node's address policy refuses (stored before the
policy, or by a node of a shared store with a looser one) is never contacted:
each of its probes counts as failed without a connection, so it turns CRITICAL
and Resolve leaves it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rpcmesh.controlplane.registry import transitions, validation
from rpcmesh.controlplane.registry.address_policy import AddressPolicy, address_refused
from rpcmesh.controlplane.registry.damping import DamperState, observe
from rpcmesh.controlplane.registry.model import DELETE, Event
from rpcmesh.controlplane.registry.node import RegistryNode
from rpcmesh.tasks import start_supervised, stop_tasks
from rpcmesh.v1 import registry_pb2

logger = logging.getLogger(__name__)

Key = tuple[str, str]


def _probe_signature(instance: registry_pb2.Instance) -> bytes:
    return (
        instance.lease_id.encode()
        + b"|"
        + instance.address.encode()
        + b"|"
        + (instance.health_check.SerializeToString(deterministic=True))
    )


class HealthProber:
    """Keeps one probe task per instance that declared a GrpcHealthCheck."""

    def __init__(
        self,
        node: RegistryNode,
        *,
        leadership_check_interval: float = 0.25,
        address_policy: AddressPolicy | None = None,
    ) -> None:
        self.node = node
        self.address_policy = address_policy if address_policy is not None else node.settings.address_policy
        """Addresses this prober may contact (default: the node's settings)."""
        self.leadership_check_interval = leadership_check_interval
        self._tasks: dict[Key, tuple[bytes, asyncio.Task[None]]] = {}
        self._active = False
        self._leadership: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """This node probes (it leads expiry)."""
        return self._active

    def start(self) -> None:
        """Follow changes, and probe the registered instances whenever this node leads expiry."""
        self.node.listeners.append(self._on_event)
        self._follow_leadership_once()
        self._leadership = start_supervised(self._follow_leadership, name="registry-probe-leadership")

    async def stop(self) -> None:
        """Cancel every probe."""
        with contextlib.suppress(ValueError):
            self.node.listeners.remove(self._on_event)
        if self._leadership is not None:
            await stop_tasks([self._leadership])
            self._leadership = None
        self._active = False
        await self._cancel_all()

    async def _cancel_all(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        await stop_tasks(tasks)

    def _follow_leadership_once(self) -> bool:
        """Start probing on becoming the leader; returns True when probing must stop."""
        leads = self.node.store.is_leader
        if leads and not self._active:
            self._active = True
            for instance in self.node.view.instances():
                self._sync(instance)
            return False
        if not leads and self._active:
            self._active = False
            return True
        return False

    async def _follow_leadership(self) -> None:
        while True:
            if self._follow_leadership_once():
                await self._cancel_all()
            await asyncio.sleep(self.leadership_check_interval)

    def __len__(self) -> int:
        return len(self._tasks)

    def _on_event(self, event: Event) -> None:
        if not self._active:
            return
        key = (event.instance.service, event.instance.instance_id)
        if event.type == DELETE:
            self._cancel(key)
        else:
            self._sync(event.instance)

    def _cancel(self, key: Key) -> None:
        entry = self._tasks.pop(key, None)
        if entry is not None:
            entry[1].cancel()

    def _sync(self, instance: registry_pb2.Instance) -> None:
        key = (instance.service, instance.instance_id)
        if not instance.HasField("health_check"):
            self._cancel(key)
            return
        signature = _probe_signature(instance)
        entry = self._tasks.get(key)
        if entry is not None and entry[0] == signature:
            return
        self._cancel(key)
        copy = registry_pb2.Instance()
        copy.CopyFrom(instance)
        task = start_supervised(
            partial(self._probe_loop, copy), name=f"probe-{instance.service}-{instance.instance_id}"
        )
        self._tasks[key] = (signature, task)

    async def _probe_loop(self, instance: registry_pb2.Instance) -> None:
        check = instance.health_check
        interval = validation.probe_interval_ms(check) / 1000
        timeout = validation.probe_timeout_ms(check) / 1000
        failures = check.failures_before_critical or validation.DEFAULT_FAILURES_BEFORE_CRITICAL
        successes = check.successes_before_passing or validation.DEFAULT_SUCCESSES_BEFORE_PASSING
        probe_failing = (
            instance.health == registry_pb2.HEALTH_STATE_CRITICAL
            and instance.reported_status != registry_pb2.SERVING_STATUS_NOT_SERVING
        )
        state = DamperState(passing=not probe_failing)
        refused = address_refused(self.address_policy, instance.address)
        async with contextlib.AsyncExitStack() as stack:
            stub: health_pb2_grpc.HealthStub | None = None
            if refused is None:
                channel = await stack.enter_async_context(grpc.aio.insecure_channel(instance.address))
                stub = health_pb2_grpc.HealthStub(channel)
            else:
                logger.warning(
                    "not probing %s/%s at %s: %s (the address policy); its probes count as failed",
                    instance.service,
                    instance.instance_id,
                    instance.address,
                    refused,
                )
            while True:
                ok = stub is not None and await _probe(stub, check.service_name, timeout)
                new_state = observe(
                    state, ok, failures_before_critical=failures, successes_before_passing=successes
                )
                if new_state.passing != state.passing:
                    decide = partial(
                        transitions.probe_verdict, lease_id=instance.lease_id, passing=new_state.passing
                    )
                    try:
                        await self.node.mutate(instance.service, instance.instance_id, decide)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        logger.warning(
                            "could not record probe verdict of %s", instance.instance_id, exc_info=True
                        )
                        await asyncio.sleep(interval)
                        continue
                state = new_state
                await asyncio.sleep(interval)


async def _probe(stub: health_pb2_grpc.HealthStub, service_name: str, deadline_s: float) -> bool:
    try:
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=deadline_s)
    except grpc.aio.AioRpcError:
        return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)
