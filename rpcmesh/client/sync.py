"""The sync API: :class:`SyncMesh` and its channels, for scripts and threads.

Same policies and the same decision core (:class:`~rpcmesh.client.attempts.CallController`,
:class:`~rpcmesh.client.endpoints.ServiceCore`) as the asyncio :class:`~rpcmesh.client.Mesh`;
only the I/O differs: a watch thread per service, ``grpc.Channel`` sub-channels,
blocking attempts and ``time.sleep`` backoff. Hedged unary calls use the
sub-channels' futures.

Usage::

    with SyncMesh("127.0.0.1:50051") as mesh:
        stub = echo_pb2_grpc.EchoStub(mesh.channel("echo"))
        reply = stub.Echo(echo_pb2.EchoRequest(message="hi"))
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

from rpcmesh.client._replay import SyncRequestReplay
from rpcmesh.client._shell import (
    attempt_metadata,
    begin_attempt,
    end_attempt,
    end_hedge,
    finish_call,
    mesh_error,
    outcome_of,
    send_attempt,
    start_call,
    try_hedge,
)
from rpcmesh.client._telemetry import CallTelemetry
from rpcmesh.client.attempts import Attempt, AttemptOutcome, CallController
from rpcmesh.client.breaker import BreakerSnapshot
from rpcmesh.client.context import effective_deadline
from rpcmesh.client.endpoints import EndpointView
from rpcmesh.client.picker import EndpointState
from rpcmesh.client.policy import MeshPolicy, MethodPolicy
from rpcmesh.client.sync_discovery import CALLABLES, CHANNEL, SyncService
from rpcmesh.errors import to_rpc_status_error
from rpcmesh.security.client import ClientSecurity
from rpcmesh.telemetry.setup import Telemetry

__all__ = ["SyncMesh", "SyncMeshChannel"]

logger = logging.getLogger(__name__)

_OK = grpc.StatusCode.OK
DISCOVERY_WAIT = 10.0


class _SyncMethod:
    def __init__(self, service: SyncService, method: str, shape: str, ser: Any, deser: Any) -> None:
        self.service = service
        self.method = method
        self.shape = shape
        self.ser = ser
        self.deser = deser
        self.policy: MethodPolicy = service.core.policy.for_method(method)
        self.replay_limit = service.core.policy.max_buffered_request_bytes

    def callable_for(self, endpoint: EndpointState) -> Any:
        cache = endpoint.extra.get(CALLABLES)
        if not isinstance(cache, dict):
            raise mesh_error(grpc.StatusCode.UNAVAILABLE, f"instance {endpoint.instance_id} was removed")
        found = cache.get(self)
        if found is None:
            channel = endpoint.extra[CHANNEL]
            found = getattr(channel, self.shape)(
                self.method, request_serializer=self.ser, response_deserializer=self.deser
            )
            cache[self] = found
        return found

    def controller(self, timeout: float | None, telemetry: CallTelemetry | None) -> CallController:
        now = time.monotonic()
        deadline = effective_deadline(timeout, self.policy.timeout, now)
        if not self.service.core.synced:
            wait = DISCOVERY_WAIT if deadline is None else max(0.0, min(DISCOVERY_WAIT, deadline - now))
            if not self.service.wait_synced(wait):
                raise mesh_error(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no instances known for service '{self.service.core.service}': watch not synced",
                )
        return start_call(CallController(self.service.core, self.method, self.policy, deadline), telemetry)

    def kwargs(
        self, controller: CallController, metadata: Any, wait_for_ready: bool | None, compression: Any
    ) -> dict[str, Any]:
        return {
            "timeout": controller.remaining(),
            "metadata": attempt_metadata(metadata, controller.attempts),
            "wait_for_ready": self.policy.wait_for_ready if wait_for_ready is None else wait_for_ready,
            "compression": compression,
        }

    # -- unary response ----------------------------------------------------------------------------------

    def unary_response(
        self,
        request: Any,
        replay: SyncRequestReplay | None,
        timeout: float | None,
        metadata: Any,
        wait_for_ready: bool | None,
        compression: Any,
    ) -> Any:
        telemetry = CallTelemetry.begin(self.service.telemetry, self.method)
        if telemetry is None:
            return self._unary(None, request, replay, timeout, metadata, wait_for_ready, compression)
        try:
            response = self._unary(telemetry, request, replay, timeout, metadata, wait_for_ready, compression)
        except BaseException as exc:
            telemetry.finish_with_error(exc)
            raise
        telemetry.finish(_OK)
        return response

    def _unary(
        self,
        telemetry: CallTelemetry | None,
        request: Any,
        replay: SyncRequestReplay | None,
        timeout: float | None,
        metadata: Any,
        wait_for_ready: bool | None,
        compression: Any,
    ) -> Any:
        try:
            controller = self.controller(timeout, telemetry)
            try:
                if self.policy.hedging is not None and replay is None:
                    return self._hedged(controller, telemetry, request, metadata, wait_for_ready, compression)
                return self._retried(
                    controller, telemetry, request, replay, metadata, wait_for_ready, compression
                )
            finally:
                controller.release()  # an exception in user code, an interrupt: nothing stays held
        except grpc.RpcError as error:
            raise to_rpc_status_error(error) from None  # typed: NotFoundError and still a grpc.RpcError

    def _retried(
        self,
        controller: CallController,
        telemetry: CallTelemetry | None,
        request: Any,
        replay: SyncRequestReplay | None,
        metadata: Any,
        wait_for_ready: bool | None,
        compression: Any,
    ) -> Any:
        delay: float | None = None
        reason: str | None = None
        while True:
            attempt = begin_attempt(controller, telemetry)
            endpoint = attempt.endpoint
            started = time.monotonic()
            try:
                payload = replay.attempt() if replay is not None else request
                options = self.kwargs(controller, metadata, wait_for_ready, compression)
                send = self.callable_for(endpoint)
                response = send_attempt(
                    attempt, telemetry, send, payload, options, backoff_s=delay, reason=reason
                )
            except grpc.RpcError as error:
                committed = replay is not None and replay.overflowed
                outcome = outcome_of(error, time.monotonic() - started, committed=committed)
                delay = end_attempt(controller, attempt, outcome, telemetry)
                if delay is None:
                    finish_call(controller, outcome.code, telemetry)
                    raise
                reason = outcome.code.name
                time.sleep(delay)
                continue
            except BaseException:
                controller.abandon_attempt(attempt)
                raise
            outcome = AttemptOutcome(code=_OK, duration=time.monotonic() - started)
            end_attempt(controller, attempt, outcome, telemetry)
            finish_call(controller, _OK, telemetry)
            return response

    def _hedged(
        self,
        controller: CallController,
        telemetry: CallTelemetry | None,
        request: Any,
        metadata: Any,
        wait_for_ready: bool | None,
        compression: Any,
    ) -> Any:
        running: dict[Any, tuple[Attempt, float]] = {}
        finished = threading.Event()

        def launch() -> None:
            attempt = begin_attempt(controller, telemetry)
            try:
                options = self.kwargs(controller, metadata, wait_for_ready, compression)
                send = self.callable_for(attempt.endpoint).future
                future = send_attempt(attempt, telemetry, send, request, options, hedge=attempt.number > 1)
            except BaseException:
                controller.abandon_attempt(attempt)
                raise
            running[future] = (attempt, time.monotonic())
            future.add_done_callback(lambda _: finished.set())

        last: grpc.RpcError | None = None
        try:
            launch()
            while True:
                wait = controller.hedge_wait()
                if not running:
                    if wait is None:
                        break
                    time.sleep(wait)  # a pushback delays the next hedge
                    if not try_hedge(controller, launch):
                        break
                    continue
                finished.wait(wait)
                finished.clear()  # before looking, so a completion from now on sets it again
                for future in [future for future in running if future.done()]:
                    attempt, started = running.pop(future)
                    error = future.exception()
                    if error is None:
                        outcome = AttemptOutcome(code=_OK, duration=time.monotonic() - started)
                        end_hedge(controller, attempt, outcome, telemetry)
                        finish_call(controller, _OK, telemetry)
                        return future.result()
                    assert isinstance(error, grpc.RpcError)
                    last = error
                    outcome = outcome_of(error, time.monotonic() - started)
                    if not end_hedge(controller, attempt, outcome, telemetry):
                        finish_call(controller, outcome.code, telemetry)
                        raise error
                try_hedge(controller, launch)
            assert last is not None
            finish_call(controller, last.code(), telemetry)
            raise last
        finally:
            for future, (attempt, _) in running.items():
                future.cancel()
                controller.abandon_attempt(attempt)

    # -- streamed responses ------------------------------------------------------------------------------

    def stream_response(
        self,
        request: Any,
        replay: SyncRequestReplay | None,
        timeout: float | None,
        metadata: Any,
        wait_for_ready: bool | None,
        compression: Any,
    ) -> Iterator[Any]:
        telemetry = CallTelemetry.begin(self.service.telemetry, self.method)
        try:
            yield from self._stream(
                telemetry, request, replay, timeout, metadata, wait_for_ready, compression
            )
        except BaseException as exc:
            if telemetry is not None:
                telemetry.finish_with_error(exc)
            raise
        if telemetry is not None:
            telemetry.finish(_OK)

    def _stream(
        self,
        telemetry: CallTelemetry | None,
        request: Any,
        replay: SyncRequestReplay | None,
        timeout: float | None,
        metadata: Any,
        wait_for_ready: bool | None,
        compression: Any,
    ) -> Iterator[Any]:
        controller = self.controller(timeout, telemetry)
        delay: float | None = None
        reason: str | None = None
        try:
            while True:
                attempt = begin_attempt(controller, telemetry)
                endpoint = attempt.endpoint
                started = time.monotonic()
                committed = False
                call: Any = None
                try:
                    payload = replay.attempt() if replay is not None else request
                    options = self.kwargs(controller, metadata, wait_for_ready, compression)
                    send = self.callable_for(endpoint)
                    call = send_attempt(
                        attempt, telemetry, send, payload, options, backoff_s=delay, reason=reason
                    )
                    for response in call:
                        committed = True
                        yield response
                except grpc.RpcError as error:
                    committed = committed or (replay is not None and replay.overflowed)
                    outcome = outcome_of(error, time.monotonic() - started, committed=committed)
                    delay = end_attempt(controller, attempt, outcome, telemetry)
                    if delay is None:
                        finish_call(controller, outcome.code, telemetry)
                        # typed: NotFoundError and still a grpc.RpcError
                        raise to_rpc_status_error(error) from None
                    reason = outcome.code.name
                    time.sleep(delay)
                    continue
                except BaseException:
                    # The caller closed the iterator (GeneratorExit) or user code raised.
                    if call is not None and call.is_active():
                        call.cancel()
                    controller.abandon_attempt(attempt)
                    raise
                outcome = AttemptOutcome(code=_OK, duration=time.monotonic() - started)
                end_attempt(controller, attempt, outcome, telemetry)
                finish_call(controller, _OK, telemetry)
                return
        finally:
            controller.release()


class _Callable:
    def __init__(self, method: _SyncMethod) -> None:
        self._method = method


class _UnaryUnary(_Callable):
    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return self._method.unary_response(request, None, timeout, metadata, wait_for_ready, compression)


class _StreamUnary(_Callable):
    def __call__(
        self,
        request_iterator: Iterable[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        replay = SyncRequestReplay(request_iterator, self._method.replay_limit)
        return self._method.unary_response(None, replay, timeout, metadata, wait_for_ready, compression)


class _UnaryStream(_Callable):
    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Iterator[Any]:
        return self._method.stream_response(request, None, timeout, metadata, wait_for_ready, compression)


class _StreamStream(_Callable):
    def __call__(
        self,
        request_iterator: Iterable[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Iterator[Any]:
        replay = SyncRequestReplay(request_iterator, self._method.replay_limit)
        return self._method.stream_response(None, replay, timeout, metadata, wait_for_ready, compression)


class SyncMeshChannel:
    """A blocking channel to every passing instance of one service; use it like a ``grpc.Channel``."""

    def __init__(self, service: SyncService) -> None:
        self._service = service

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> _UnaryUnary:
        """A unary-unary multicallable (raw bytes without serializers)."""
        return _UnaryUnary(
            _SyncMethod(self._service, method, "unary_unary", request_serializer, response_deserializer)
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> _UnaryStream:
        """A unary-stream multicallable."""
        return _UnaryStream(
            _SyncMethod(self._service, method, "unary_stream", request_serializer, response_deserializer)
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> _StreamUnary:
        """A stream-unary multicallable."""
        return _StreamUnary(
            _SyncMethod(self._service, method, "stream_unary", request_serializer, response_deserializer)
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> _StreamStream:
        """A stream-stream multicallable."""
        return _StreamStream(
            _SyncMethod(self._service, method, "stream_stream", request_serializer, response_deserializer)
        )

    def close(self) -> None:
        """No-op: sub-channels belong to the SyncMesh."""


class SyncMesh:
    """Blocking counterpart of :class:`~rpcmesh.client.Mesh`, with the same policies and core.

    ``security`` and ``telemetry`` mean what they mean for :class:`~rpcmesh.client.Mesh`.
    """

    def __init__(
        self,
        registry: str | Sequence[str],
        *,
        policy: MeshPolicy | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        security: ClientSecurity | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._registries = [registry] if isinstance(registry, str) else list(registry)
        if not self._registries:
            raise ValueError("registry: at least one address is needed")
        self.policy = policy or MeshPolicy()
        self.security = security if security is not None else ClientSecurity.from_env()
        self._telemetry = telemetry
        self._options = list(channel_options)
        self._services: dict[str, SyncService] = {}
        self._lock = threading.Lock()

    def _service(self, name: str) -> SyncService:
        with self._lock:
            service = self._services.get(name)
            if service is None:
                service = SyncService(
                    name,
                    self.policy.for_service(name),
                    self._registries,
                    self._options,
                    security=self.security,
                    telemetry=self._telemetry,
                )
                self._services[name] = service
            return service

    def channel(self, service: str) -> SyncMeshChannel:
        """A channel to ``service``, usable with any generated stub."""
        return SyncMeshChannel(self._service(service))

    def wait_for_instances(self, service: str, count: int = 1, within: float = 10.0) -> list[EndpointView]:
        """Block until at least ``count`` passing instances of ``service`` are known."""
        core = self._service(service).core
        deadline = time.monotonic() + within
        while True:
            views = core.endpoints()
            if len(views) >= count:
                return views
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{service}: {len(views)} instance(s) known, wanted {count}")
            time.sleep(0.02)

    def endpoints(self, service: str) -> list[EndpointView]:
        """The known passing instances of ``service`` with load, picks and breaker state."""
        return self._service(service).core.endpoints()

    def breakers(self, service: str) -> dict[str, BreakerSnapshot]:
        """Breaker states of ``service`` by breaker name."""
        core = self._service(service).core
        found: dict[str, BreakerSnapshot] = {}
        if core.breaker is not None:
            found[core.breaker.name] = core.breaker.snapshot()
        for view in core.endpoints():
            if view.breaker is not None:
                found[view.breaker.name] = view.breaker
        return found

    def close(self) -> None:
        """Stop every watch thread and close every sub-channel."""
        with self._lock:
            services = list(self._services.values())
            self._services.clear()
        for service in services:
            service.close()

    def __enter__(self) -> SyncMesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
