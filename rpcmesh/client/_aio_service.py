"""asyncio shell of one service: its Registry watch and one sub-channel per instance.

The watch and the per-instance connectivity monitors are supervised
(:func:`rpcmesh.tasks.start_supervised`): a run that ends with an unexpected exception is
logged at ERROR and restarted with backoff (the watch from a fresh snapshot). Any failure or
end of the watch stream is a lost connection: the last known instances keep serving while
it reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from rpcmesh.client._telemetry import breaker_listener
from rpcmesh.client.backoff import ExponentialBackoff
from rpcmesh.client.endpoints import EndpointChanges, ServiceCore
from rpcmesh.client.picker import EndpointState
from rpcmesh.client.policy import ServicePolicy
from rpcmesh.security.client import ClientSecurity, aio_channel
from rpcmesh.tasks import start_supervised, stop_tasks
from rpcmesh.telemetry.aio_channel import trace_aio_channel
from rpcmesh.telemetry.setup import Telemetry, get_telemetry
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

__all__ = ["AioService"]

logger = logging.getLogger(__name__)

CHANNEL_KEY = "aio_channel"
CALLABLES_KEY = "aio_callables"


class AioService:
    """Discovery and sub-channels of one service for asyncio callers."""

    def __init__(
        self,
        service: str,
        policy: ServicePolicy,
        registry_stub: Callable[[bool], registry_pb2_grpc.RegistryAsyncStub],
        *,
        channel_options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        security: ClientSecurity | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.telemetry = telemetry
        self.core = ServiceCore(service, policy, on_breaker_transition=breaker_listener(telemetry))
        self._security = security
        self._registry_stub = registry_stub
        self._options = list(channel_options)
        self._interceptors = list(interceptors)
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._monitors: dict[str, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.watch_connects = 0

    @property
    def name(self) -> str:
        """The service name."""
        return self.core.service

    def start(self) -> None:
        """Start watching the Registry (idempotent)."""
        if self._task is None:
            self._task = start_supervised(self._supervised_watch, name=f"mesh-watch-{self.name}")

    async def wait_synced(self, timeout: float | None) -> bool:  # noqa: ASYNC109
        """Wait until the first snapshot arrived; False on timeout."""
        if self._synced.is_set():
            return True
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _supervised_watch(self) -> None:
        try:
            await self._watch()
        except Exception:
            # The view may be half-updated: the next run starts over from a snapshot.
            self.core.synced = False
            raise

    async def _watch(self) -> None:
        backoff = ExponentialBackoff(initial=0.1, maximum=5.0)
        rotate = False
        while True:
            stub = self._registry_stub(rotate)
            rotate = False
            after = self.core.revision if self.core.synced else 0
            try:
                self.watch_connects += 1
                call = stub.Watch(registry_pb2.WatchRequest(service=self.name, after_revision=after))
                async for response in call:
                    self._apply(self.core.apply(response))
                    if self.core.synced:
                        self._synced.set()
                    backoff.reset()
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.OUT_OF_RANGE:
                    # Events after our revision are gone: start over from a snapshot.
                    self.core.synced = False
                    continue
                rotate = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                logger.info(
                    "watch of %s failed (%s); last known instances keep serving", self.name, exc.code().name
                )
            except (asyncio.InvalidStateError, grpc.RpcError) as exc:
                rotate = True
                logger.info("watch of %s broke (%r); last known instances keep serving", self.name, exc)
            else:
                logger.info("watch of %s ended; reconnecting", self.name)
            await asyncio.sleep(backoff.next())

    def _apply(self, changes: EndpointChanges) -> None:
        for endpoint in changes.removed:
            self._close_endpoint(endpoint)
        for endpoint in changes.added:
            channel: grpc.aio.Channel = aio_channel(
                endpoint.address, self._security, options=self._options, interceptors=self._interceptors
            )
            if (self.telemetry or get_telemetry()).active:
                # Per attempt: each attempt is a CLIENT span of its own, made outside the user's
                # interceptors (as the first interceptor would) without grpc.aio's interceptor
                # machinery. With telemetry off the sub-channel stays uninstrumented (zero cost);
                # the mesh sends the correlation id.
                channel = trace_aio_channel(channel, self.telemetry, target=endpoint.address)
            endpoint.extra[CHANNEL_KEY] = channel
            endpoint.extra[CALLABLES_KEY] = {}
            self._monitors[endpoint.instance_id] = start_supervised(
                functools.partial(self._monitor, endpoint, channel),
                name=f"mesh-monitor-{self.name}-{endpoint.instance_id}",
            )

    def _close_endpoint(self, endpoint: EndpointState) -> None:
        monitor = self._monitors.pop(endpoint.instance_id, None)
        if monitor is not None:
            monitor.cancel()
        channel = endpoint.extra.pop(CHANNEL_KEY, None)
        if isinstance(channel, grpc.aio.Channel):
            # Give in-flight calls the grace of the channel close; new picks no longer see it.
            task = asyncio.get_running_loop().create_task(channel.close(grace=5.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _monitor(self, endpoint: EndpointState, channel: grpc.aio.Channel) -> None:
        """Track the sub-channel's connectivity so a dead instance stops being picked at once."""
        state = channel.get_state(try_to_connect=True)
        while True:
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                endpoint.connection_failed = True
            elif state is grpc.ChannelConnectivity.READY:
                endpoint.connection_failed = False
            elif state is grpc.ChannelConnectivity.SHUTDOWN:
                return
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=False)

    async def close(self) -> None:
        """Stop the watch and close every sub-channel."""
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None
        await stop_tasks(self._monitors.values())
        self._monitors.clear()
        await stop_tasks(list(self._closing))
        for endpoint in self.core.clear():
            channel = endpoint.extra.pop(CHANNEL_KEY, None)
            if isinstance(channel, grpc.aio.Channel):
                await channel.close()
