"""Keeps a service instance registered: one KeepAlive stream, registering again when the lease is lost.

The keeper registers the instance, then renews its lease over a single
``Registry.KeepAlive`` stream every third of the TTL. A renewal answered with
NOT_FOUND (the lease expired, e.g. while the Registry was down or restarted
with its leases gone) or PERMISSION_DENIED makes it register again, keeping the
instance id.

Any failure of the stream (an error status, an end of stream, an answer that
does not come, or a write on a call that already finished, as happens when the
Registry restarts while the keeper sleeps between renewals) counts as a lost
connection: the keeper reconnects with exponential backoff, rotating over the
configured Registry addresses, and renews (or registers again on NOT_FOUND).
A registration the Registry refuses (PERMISSION_DENIED, UNAUTHENTICATED) is
logged at ERROR with its reason and retried with a longer backoff. The keeper's
loop is supervised (:func:`rpcmesh.tasks.start_supervised`): should it ever end
with an unexpected exception, that is logged at ERROR and the loop restarted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc
import grpc.aio
from google.protobuf import duration_pb2

from rpcmesh.client.backoff import ExponentialBackoff
from rpcmesh.security.client import ClientSecurity, aio_channel
from rpcmesh.tasks import start_supervised, stop_tasks
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

__all__ = ["LeaseKeeper", "LeaseLostError"]

logger = logging.getLogger(__name__)

_CODE_OK = 0
_CODE_NOT_FOUND = 5
_CODE_PERMISSION_DENIED = 7

_REFUSED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
"""Codes by which the Registry refuses us: no retry soon will change its mind."""

REFUSED_RETRY_INITIAL = 1.0
"""Seconds before the first retry of a refused registration (doubling per refusal)."""
REFUSED_RETRY_MAX = 30.0
"""Longest wait between retries of a refused registration."""


class LeaseLostError(Exception):
    """The Registry no longer knows the lease; the instance must register again."""


class _StreamLost(Exception):
    """The KeepAlive stream failed or ended: the connection to the Registry is lost."""


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromMilliseconds(round(seconds * 1000))
    return value


class LeaseKeeper:
    """Registers one instance and keeps its lease alive until stopped.

    Attributes:
        instance_id: The registered instance id (assigned by the Registry when not given).
        registrations: How many times the instance was registered (1 + re-registrations).
        refusal: Why the Registry last refused to register the instance (``"CODE: details"``),
            empty when the last registration succeeded.
    """

    def __init__(
        self,
        instance: registry_pb2.Instance,
        *,
        ttl: float,
        registries: Sequence[str],
        rpc_timeout: float = 3.0,
        security: ClientSecurity | None = None,
    ) -> None:
        self._instance = instance
        self._security = security
        self._ttl = ttl
        self._registries = list(registries)
        self._rpc_timeout = rpc_timeout
        self._index = 0
        self._channel: grpc.aio.Channel | None = None
        self._stub: registry_pb2_grpc.RegistryAsyncStub | None = None
        self._task: asyncio.Task[None] | None = None
        self._lease_id = ""
        self._lease_token = ""
        self._registered = asyncio.Event()
        self.instance_id = instance.instance_id
        self.registrations = 0
        self.refusal = ""

    @property
    def registered(self) -> bool:
        """Whether the instance currently holds a lease (as far as the keeper knows)."""
        return self._registered.is_set()

    @property
    def lease_id(self) -> str:
        """The current lease id, empty when not registered."""
        return self._lease_id

    async def start(self, wait: float = 10.0) -> bool:
        """Start keeping the lease; waits up to ``wait`` seconds for the first registration.

        Returns whether the instance is registered; when not, the keeper goes on
        trying in the background.
        """
        self._task = start_supervised(self._run, name=f"lease-keeper-{self._instance.service}")
        try:
            await asyncio.wait_for(asyncio.shield(self._registered.wait()), wait)
        except TimeoutError:
            if self.refusal:
                logger.error(
                    "%s: not registered after %.1fs, the registry refuses it (%s); still trying",
                    self._instance.service,
                    wait,
                    self.refusal,
                )
            else:
                logger.warning("%s: not registered after %.1fs; still trying", self._instance.service, wait)
        return self.registered

    async def stop(self, *, deregister: bool = True) -> None:
        """Stop renewing; report NOT_SERVING and deregister (best effort)."""
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None
        if deregister and self._lease_token and self._stub is not None:
            try:
                await self._stub.ReportHealth(
                    registry_pb2.ReportHealthRequest(
                        service=self._instance.service,
                        instance_id=self.instance_id,
                        lease_token=self._lease_token,
                        status=registry_pb2.SERVING_STATUS_NOT_SERVING,
                    ),
                    timeout=self._rpc_timeout,
                )
            except grpc.aio.AioRpcError as exc:
                logger.info("reporting NOT_SERVING failed: %s", exc.code().name)
            try:
                await self._stub.Deregister(
                    registry_pb2.DeregisterRequest(
                        service=self._instance.service,
                        instance_id=self.instance_id,
                        lease_token=self._lease_token,
                    ),
                    timeout=self._rpc_timeout,
                )
            except grpc.aio.AioRpcError as exc:
                logger.warning("deregistering %s failed: %s", self.instance_id, exc.code().name)
        self._registered.clear()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    def _connect(self) -> registry_pb2_grpc.RegistryAsyncStub:
        if self._stub is None:
            address = self._registries[self._index % len(self._registries)]
            self._channel = aio_channel(address, self._security, options=self._channel_options())
            self._stub = registry_pb2_grpc.RegistryStub(self._channel)
        return self._stub

    def _channel_options(self) -> list[tuple[str, int]]:
        # A subchannel of its own: gRPC shares subchannels between channels with equal
        # arguments, and a fresh channel would otherwise inherit a shared subchannel's
        # reconnect backoff (1 s growing to 120 s), longer than a short TTL can wait out.
        # Its own reconnect backoff stays within a renewal period for the same reason.
        longest_ms = max(100, round(min(5.0, self._ttl / 3) * 1000))
        return [
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", longest_ms),
        ]

    async def _rotate(self) -> None:
        """Drop the channel (a fresh one skips gRPC's reconnect backoff) and move to the next address."""
        channel, self._channel, self._stub = self._channel, None, None
        self._index += 1
        if channel is not None:
            await channel.close()

    async def _run(self) -> None:
        try:
            await self._keep_registered()
        except Exception:
            # The supervisor logs this and runs us again: start that run on a fresh channel.
            await self._rotate()
            raise

    async def _keep_registered(self) -> None:
        backoff = ExponentialBackoff(initial=0.1, maximum=min(5.0, self._ttl / 3))
        refused = ExponentialBackoff(initial=REFUSED_RETRY_INITIAL, maximum=REFUSED_RETRY_MAX)
        while True:
            try:
                if not self._lease_id:
                    await self._register()
                    backoff.reset()
                    refused.reset()
                await self._keep_alive(backoff)
            except LeaseLostError as exc:
                logger.warning(
                    "%s/%s: lease lost (%s); registering again", self._instance.service, self.instance_id, exc
                )
                self._lease_id = ""
                self._registered.clear()
            except _StreamLost as exc:
                delay = backoff.next()
                logger.info(
                    "%s/%s: KeepAlive stream lost (%s); reconnecting in %.2fs",
                    self._instance.service,
                    self.instance_id,
                    exc,
                    delay,
                )
                await self._rotate()
                await asyncio.sleep(delay)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in _REFUSED:
                    self.refusal = f"{code.name}: {exc.details()}"
                    delay = refused.next()
                    logger.error(
                        "%s/%s: the registry refused the registration (%s); retrying in %.1fs",
                        self._instance.service,
                        self.instance_id,
                        self.refusal,
                        delay,
                    )
                else:
                    delay = backoff.next()
                    logger.info(
                        "registry call failed (%s: %s); retrying in %.2fs", code.name, exc.details(), delay
                    )
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS):
                    # Our token no longer matches; register afresh under the same id.
                    self._lease_token = ""
                    self._lease_id = ""
                    self._registered.clear()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    await self._rotate()
                await asyncio.sleep(delay)

    async def _register(self) -> None:
        stub = self._connect()
        instance = registry_pb2.Instance()
        instance.CopyFrom(self._instance)
        instance.instance_id = self.instance_id
        response = await stub.Register(
            registry_pb2.RegisterRequest(
                instance=instance, ttl=_duration(self._ttl), lease_token=self._lease_token
            ),
            timeout=self._rpc_timeout,
        )
        self.instance_id = response.instance_id
        self._lease_id = response.lease_id
        self._lease_token = response.lease_token
        self.registrations += 1
        self.refusal = ""
        self._registered.set()
        logger.info(
            "registered %s/%s at %s (lease %s)",
            instance.service,
            self.instance_id,
            instance.address,
            self._lease_id,
        )

    async def _renew(
        self,
        call: grpc.aio.StreamStreamCall[registry_pb2.KeepAliveRequest, registry_pb2.KeepAliveResponse],
    ) -> registry_pb2.KeepAliveResponse:
        """One renewal on ``call``; every way the stream can fail becomes :class:`_StreamLost`."""
        try:
            await call.write(
                registry_pb2.KeepAliveRequest(lease_id=self._lease_id, lease_token=self._lease_token)
            )
            response = await asyncio.wait_for(call.read(), timeout=max(self._ttl / 3, self._rpc_timeout))
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _REFUSED:
                raise  # not a lost connection: handled (and logged at ERROR) as a refusal
            raise _StreamLost(f"{exc.code().name}: {exc.details()}") from exc
        except TimeoutError as exc:
            raise _StreamLost("no answer in time") from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # e.g. asyncio.InvalidStateError("RPC already finished.") when the stream ended
            # while we slept between renewals.
            raise _StreamLost(repr(exc)) from exc
        if response is grpc.aio.EOF:
            raise _StreamLost("the Registry ended the KeepAlive stream")
        assert isinstance(response, registry_pb2.KeepAliveResponse)
        return response

    async def _keep_alive(self, backoff: ExponentialBackoff) -> None:
        stub = self._connect()
        interval = self._ttl / 3
        call = stub.KeepAlive()
        try:
            while True:
                response = await self._renew(call)
                if response.code == _CODE_NOT_FOUND:
                    raise LeaseLostError(response.message or "NOT_FOUND")
                if response.code == _CODE_PERMISSION_DENIED:
                    self._lease_token = ""
                    raise LeaseLostError(response.message or "PERMISSION_DENIED")
                if response.code != _CODE_OK:
                    logger.warning("lease renewal answered %d: %s", response.code, response.message)
                backoff.reset()
                self._registered.set()
                await asyncio.sleep(interval)
        finally:
            call.cancel()
