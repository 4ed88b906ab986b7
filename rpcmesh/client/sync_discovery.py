"""Discovery for the sync API: one watch thread per service keeps its endpoints and sub-channels.

:class:`SyncService` is the sync twin of the asyncio Mesh's service: a daemon
thread follows ``Registry.Watch`` for one service through the control-plane
addresses in turn (with backoff), applies each response to the shared
:class:`~rpcmesh.client.endpoints.ServiceCore`, and opens or closes a
``grpc.Channel`` per endpoint. A fault inside the thread is logged and the
watch restarted. It logs as ``rpcmesh.client.sync``, the sync API's logger.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from rpcmesh.client._telemetry import breaker_listener
from rpcmesh.client.backoff import ExponentialBackoff
from rpcmesh.client.endpoints import EndpointChanges, ServiceCore
from rpcmesh.client.picker import EndpointState
from rpcmesh.client.policy import ServicePolicy
from rpcmesh.security.client import ClientSecurity, sync_channel
from rpcmesh.telemetry.grpc_sync import sync_client_interceptors
from rpcmesh.telemetry.setup import Telemetry, get_telemetry
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

__all__ = ["CALLABLES", "CHANNEL", "SyncService"]

logger = logging.getLogger("rpcmesh.client.sync")

CHANNEL = "sync_channel"
RAW_CHANNEL = "sync_raw_channel"
CALLABLES = "sync_callables"


class SyncService:
    """Watch thread and sub-channels of one service."""

    def __init__(
        self,
        service: str,
        policy: ServicePolicy,
        registries: Sequence[str],
        options: Sequence[tuple[str, Any]],
        security: ClientSecurity | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.telemetry = telemetry
        self._security = security
        self.core = ServiceCore(service, policy, on_breaker_transition=breaker_listener(telemetry))
        self._registries = list(registries)
        self._options = list(options)
        self._synced = threading.Event()
        self._stopped = threading.Event()
        self._call: Any = None
        self._channel: grpc.Channel | None = None
        self._thread = threading.Thread(target=self._watch, name=f"mesh-watch-{service}", daemon=True)
        self._thread.start()

    def wait_synced(self, within: float) -> bool:
        """Whether the first watch response arrived within ``within`` seconds."""
        return self._synced.wait(within)

    def _watch(self) -> None:
        """The watch thread's loop: it ends only on close; any failure reconnects with backoff.

        A stream that fails or ends reconnects (to the next Registry address); anything
        else that goes wrong (a bug, a library error) is logged at ERROR and the watch
        restarts the same way, so the thread never dies and leaves the service unwatched.
        """
        backoff = ExponentialBackoff(initial=0.1, maximum=5.0)
        index = 0
        while not self._stopped.is_set():
            address = self._registries[index % len(self._registries)]
            try:
                self._watch_stream(address, backoff)
            except grpc.RpcError as exc:
                code = exc.code()
                if code is grpc.StatusCode.OUT_OF_RANGE:
                    self.core.synced = False  # compacted past our revision: take a fresh snapshot
                    continue
                if code is grpc.StatusCode.CANCELLED and self._stopped.is_set():
                    return
                index += 1
                logger.info(
                    "watch of %s failed (%s); last known instances keep serving", self.core.service, code.name
                )
            except Exception:
                index += 1
                logger.exception("watch of %s failed; restarting it", self.core.service)
            self._stopped.wait(backoff.next())

    def _watch_stream(self, address: str, backoff: ExponentialBackoff) -> None:
        after = self.core.revision if self.core.synced else 0
        with sync_channel(address, self._security) as channel:
            self._channel = channel
            stub = registry_pb2_grpc.RegistryStub(channel)
            self._call = stub.Watch(
                registry_pb2.WatchRequest(service=self.core.service, after_revision=after)
            )
            if self._stopped.is_set():
                self._call.cancel()  # close() ran while the stream was being opened
            for response in self._call:
                self._apply(self.core.apply(response, self._open))
                if self.core.synced:
                    self._synced.set()
                backoff.reset()

    def _apply(self, changes: EndpointChanges) -> None:
        for endpoint in changes.removed:
            _close_endpoint(endpoint)

    def _open(self, endpoint: EndpointState) -> None:
        raw = sync_channel(endpoint.address, self._security, options=self._options)
        channel = raw
        if (self.telemetry or get_telemetry()).active:
            # Per attempt, like the asyncio mesh; with telemetry off the sub-channel stays bare.
            channel = grpc.intercept_channel(
                raw, *sync_client_interceptors(self.telemetry, target=endpoint.address)
            )
        endpoint.extra[RAW_CHANNEL] = raw
        endpoint.extra[CHANNEL] = channel
        endpoint.extra[CALLABLES] = {}
        raw.subscribe(_connectivity_tracker(endpoint), try_to_connect=True)

    def close(self) -> None:
        """Stop the watch thread and close every endpoint's channel."""
        self._stopped.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(timeout=5)
        for endpoint in self.core.clear():
            _close_endpoint(endpoint)


def _close_endpoint(endpoint: EndpointState) -> None:
    endpoint.extra.pop(CHANNEL, None)
    raw = endpoint.extra.pop(RAW_CHANNEL, None)
    if isinstance(raw, grpc.Channel):
        raw.close()


def _connectivity_tracker(endpoint: EndpointState) -> Callable[[grpc.ChannelConnectivity], None]:
    def track(state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            endpoint.connection_failed = True
        elif state is grpc.ChannelConnectivity.READY:
            endpoint.connection_failed = False

    return track
