"""Active grpc.health.v1 probes of the instances that ask for them, with flap damping.

One task per probed instance calls ``grpc.health.v1.Health/Check`` every
interval with the configured timeout; results go through the pure damper
(:mod:`.damping`) and only a change of the damped verdict is written, as a
HEALTH event. Probes never run commands. With PostgreSQL every node probes
(verdict writes are idempotent, so the only cost is duplicate probes).
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
from rpcmesh.controlplane.registry.damping import DamperState, observe
from rpcmesh.controlplane.registry.model import DELETE, Event
from rpcmesh.controlplane.registry.node import RegistryNode
from rpcmesh.tasks import stop_tasks
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

    def __init__(self, node: RegistryNode) -> None:
        self.node = node
        self._tasks: dict[Key, tuple[bytes, asyncio.Task[None]]] = {}

    def start(self) -> None:
        """Probe the instances already registered, and follow changes."""
        for instance in self.node.view.instances():
            self._sync(instance)
        self.node.listeners.append(self._on_event)

    async def stop(self) -> None:
        """Cancel every probe."""
        with contextlib.suppress(ValueError):
            self.node.listeners.remove(self._on_event)
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        await stop_tasks(tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def _on_event(self, event: Event) -> None:
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
        task = asyncio.create_task(
            self._probe_loop(copy), name=f"probe-{instance.service}-{instance.instance_id}"
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
        async with grpc.aio.insecure_channel(instance.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                ok = await _probe(stub, check.service_name, timeout)
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
