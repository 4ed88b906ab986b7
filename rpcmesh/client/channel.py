"""The asyncio mesh channel: what generated stubs call, for all four RPC shapes.

``mesh.channel("echo")`` returns a :class:`MeshChannel`. Stubs call its
``unary_unary``/``unary_stream``/``stream_unary``/``stream_stream`` like on a
``grpc.aio.Channel``; with no serializers, requests and responses are raw
bytes. Every call: takes its deadline (own timeout, else the policy default,
bounded by the incoming call's deadline), passes the service breaker, then runs
attempts, each on the sub-channel of a picked instance, retrying or hedging as
the method's policy says. The decisions are made by
:class:`~rpcmesh.client.attempts.CallController`; this module only does I/O.

Interceptor order: the mesh layer (deadline, breaker, retries, hedging, picking)
is outermost, around the whole call; client interceptors given to the Mesh run
per attempt, on each sub-channel, the first listed outermost. With telemetry on,
the call has a span of its own (:mod:`rpcmesh.client._telemetry`) and each
sub-channel is traced around its interceptors (``trace_aio_channel``), so every
attempt is a CLIENT span under it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Generator, Iterable
from typing import Any

import grpc
import grpc.aio

from rpcmesh.client._aio_service import CALLABLES_KEY, CHANNEL_KEY, AioService
from rpcmesh.client._replay import RequestReplay
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
from rpcmesh.client.context import effective_deadline
from rpcmesh.client.picker import EndpointState
from rpcmesh.client.policy import MethodPolicy
from rpcmesh.errors import to_rpc_status_error

__all__ = ["MeshChannel"]

Serializer = Callable[[Any], bytes] | None
Deserializer = Callable[[bytes], Any] | None

DISCOVERY_WAIT = 10.0
"""Longest a call waits for the first Registry snapshot of its service."""

_OK = grpc.StatusCode.OK


class _Method:
    """What every call of one method shares: names, serializers, policy."""

    def __init__(self, service: AioService, method: str, shape: str, ser: Serializer, deser: Deserializer):
        self.service = service
        self.method = method
        self.shape = shape
        self.ser = ser
        self.deser = deser
        self.policy: MethodPolicy = service.core.policy.for_method(method)

    def callable_for(self, endpoint: EndpointState) -> Any:
        cache = endpoint.extra.get(CALLABLES_KEY)
        if not isinstance(cache, dict):
            raise mesh_error(grpc.StatusCode.UNAVAILABLE, f"instance {endpoint.instance_id} was removed")
        found = cache.get(self)
        if found is None:
            channel = endpoint.extra[CHANNEL_KEY]
            assert isinstance(channel, grpc.aio.Channel)
            factory = getattr(channel, self.shape)
            found = factory(self.method, request_serializer=self.ser, response_deserializer=self.deser)
            cache[self] = found
        return found

    async def controller(
        self,
        timeout: float | None,  # noqa: ASYNC109
        telemetry: CallTelemetry | None,
    ) -> CallController:
        now = time.monotonic()
        deadline = effective_deadline(timeout, self.policy.timeout, now)
        if not self.service.core.synced:
            wait = DISCOVERY_WAIT if deadline is None else max(0.0, min(DISCOVERY_WAIT, deadline - now))
            if not await self.service.wait_synced(wait):
                raise mesh_error(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no instances known for service '{self.service.name}': Registry watch not synced",
                )
        return self.start(deadline, telemetry)

    def start(self, deadline: float | None, telemetry: CallTelemetry | None) -> CallController:
        return start_call(CallController(self.service.core, self.method, self.policy, deadline), telemetry)


class _CallOptions:
    __slots__ = ("compression", "metadata", "timeout", "wait_for_ready")

    def __init__(self, timeout: float | None, metadata: Any, wait_for_ready: bool | None, compression: Any):
        self.timeout = timeout
        self.metadata = metadata
        self.wait_for_ready = wait_for_ready
        self.compression = compression

    def attempt(self, controller: CallController, policy: MethodPolicy) -> dict[str, Any]:
        wait = self.wait_for_ready if self.wait_for_ready is not None else policy.wait_for_ready
        return {
            "timeout": controller.remaining(),
            "metadata": attempt_metadata(self.metadata, controller.attempts),
            "wait_for_ready": wait,
            "compression": self.compression,
        }


class _CallBase:
    """State common to the call objects: the current attempt, for cancel and metadata."""

    def __init__(self) -> None:
        self._attempt_call: Any = None
        self._cancelled = False

    def cancel(self) -> bool:
        """Cancel the call (its current attempt)."""
        self._cancelled = True
        if self._attempt_call is not None:
            return bool(self._attempt_call.cancel())
        return True

    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled

    async def initial_metadata(self) -> Any:
        """Initial metadata of the last attempt."""
        return await self._attempt_call.initial_metadata() if self._attempt_call is not None else None

    async def trailing_metadata(self) -> Any:
        """Trailing metadata of the last attempt."""
        return await self._attempt_call.trailing_metadata() if self._attempt_call is not None else None

    async def code(self) -> grpc.StatusCode:
        """Status code of the last attempt."""
        return await self._attempt_call.code()  # type: ignore[no-any-return]

    async def details(self) -> str:
        """Status details of the last attempt."""
        return await self._attempt_call.details()  # type: ignore[no-any-return]


# -- unary request ---------------------------------------------------------------------------------------


class _UnaryResponseCall(_CallBase):
    """Awaitable call of a unary-response method (unary-unary and stream-unary)."""

    def __init__(self, method: _Method, request: Any, options: _CallOptions, replay: RequestReplay | None):
        super().__init__()
        self._method = method
        self._request = request
        self._options = options
        self._replay = replay

    def __await__(self) -> Generator[Any, None, Any]:
        return self._run().__await__()

    async def write(self, request: Any) -> None:
        """Send one request (stream-unary calls made without a request iterator)."""
        assert self._replay is not None
        await self._replay.write(request)

    async def done_writing(self) -> None:
        """End the request stream."""
        assert self._replay is not None
        await self._replay.done_writing()

    async def _run(self) -> Any:
        method = self._method
        telemetry = CallTelemetry.begin(method.service.telemetry, method.method)
        try:
            controller = await method.controller(self._options.timeout, telemetry)
            try:
                if method.policy.hedging is not None and self._replay is None:
                    response = await self._hedged(controller, telemetry)
                else:
                    response = await self._retried(controller, telemetry)
            finally:
                controller.release()  # cancelled, or an error: nothing stays held
        except grpc.RpcError as exc:
            if telemetry is not None:
                telemetry.finish_with_error(exc)
            raise to_rpc_status_error(exc) from None  # typed: NotFoundError and still an AioRpcError
        except BaseException as exc:
            if telemetry is not None:
                telemetry.finish_with_error(exc)
            raise
        finally:
            if self._replay is not None:
                self._replay.close()
        if telemetry is not None:
            telemetry.finish(_OK)
        return response

    async def _retried(self, controller: CallController, telemetry: CallTelemetry | None) -> Any:
        method = self._method
        delay: float | None = None
        reason: str | None = None
        while True:
            attempt = begin_attempt(controller, telemetry)
            endpoint = attempt.endpoint
            started = time.monotonic()
            try:
                request = self._replay.attempt() if self._replay is not None else self._request
                options = self._options.attempt(controller, method.policy)
                send = method.callable_for(endpoint)
                call = send_attempt(
                    attempt, telemetry, send, request, options, backoff_s=delay, reason=reason
                )
                self._attempt_call = call
                response = await call
            except grpc.RpcError as error:
                committed = self._replay is not None and self._replay.overflowed
                outcome = outcome_of(error, time.monotonic() - started, committed=committed)
                delay = end_attempt(controller, attempt, outcome, telemetry)
                if delay is None or self._cancelled:
                    finish_call(controller, outcome.code, telemetry)
                    raise
                reason = outcome.code.name
                await asyncio.sleep(delay)
                continue
            except BaseException:
                controller.abandon_attempt(attempt)
                raise
            end_attempt(
                controller, attempt, AttemptOutcome(code=_OK, duration=time.monotonic() - started), telemetry
            )
            finish_call(controller, _OK, telemetry)
            return response

    async def _hedged(self, controller: CallController, telemetry: CallTelemetry | None) -> Any:
        method = self._method
        running: dict[asyncio.Task[Any], tuple[Attempt, float]] = {}

        def launch() -> None:
            attempt = begin_attempt(controller, telemetry)
            try:
                options = self._options.attempt(controller, method.policy)
                send = method.callable_for(attempt.endpoint)
                call = send_attempt(
                    attempt, telemetry, send, self._request, options, hedge=attempt.number > 1
                )
            except BaseException:
                controller.abandon_attempt(attempt)
                raise
            self._attempt_call = call
            running[asyncio.ensure_future(call)] = (attempt, time.monotonic())

        last_error: BaseException | None = None
        try:
            launch()
            while True:
                wait = controller.hedge_wait()
                if not running:
                    if wait is None:
                        break
                    await asyncio.sleep(wait)  # a pushback delays the next hedge
                    if not try_hedge(controller, launch):
                        break
                    continue
                done, _ = await asyncio.wait(running, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    attempt, started = running.pop(task)
                    error = task.exception()
                    if error is None:
                        outcome = AttemptOutcome(code=_OK, duration=time.monotonic() - started)
                        end_hedge(controller, attempt, outcome, telemetry)
                        finish_call(controller, _OK, telemetry)
                        return task.result()
                    if not isinstance(error, grpc.RpcError):
                        raise error
                    last_error = error
                    outcome = outcome_of(error, time.monotonic() - started)
                    if not end_hedge(controller, attempt, outcome, telemetry):
                        finish_call(controller, outcome.code, telemetry)
                        raise error
                try_hedge(controller, launch)
            assert last_error is not None
            finish_call(controller, last_error.code(), telemetry)  # type: ignore[attr-defined]
            raise last_error
        finally:
            for task, (attempt, _) in running.items():
                task.cancel()
                controller.abandon_attempt(attempt)


# -- streamed responses ----------------------------------------------------------------------------------


class _StreamResponseCall(_CallBase):
    """Async-iterable call of a streaming-response method (unary-stream and stream-stream).

    Retried only until the first response reached the caller.
    """

    def __init__(self, method: _Method, request: Any, options: _CallOptions, replay: RequestReplay | None):
        super().__init__()
        self._method = method
        self._request = request
        self._options = options
        self._replay = replay
        self._iterator: AsyncIterator[Any] | None = None

    def __aiter__(self) -> AsyncIterator[Any]:
        if self._iterator is None:
            method = self._method
            telemetry = CallTelemetry.begin(method.service.telemetry, method.method)
            # Telemetry off: the attempts generator itself, no extra layer.
            self._iterator = self._attempts(None) if telemetry is None else self._traced(telemetry)
        return self._iterator

    async def read(self) -> Any:
        """The next response, or ``grpc.aio.EOF``."""
        try:
            return await self.__aiter__().__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF

    async def write(self, request: Any) -> None:
        """Send one request (stream-stream calls made without a request iterator)."""
        assert self._replay is not None
        await self._replay.write(request)

    async def done_writing(self) -> None:
        """End the request stream."""
        assert self._replay is not None
        await self._replay.done_writing()

    async def _traced(self, telemetry: CallTelemetry) -> AsyncIterator[Any]:
        """The attempts, with the call's span ended by the stream's end, error or close."""
        attempts = self._attempts(telemetry)
        try:
            async for response in attempts:
                yield response
        except BaseException as exc:
            telemetry.finish_with_error(exc)
            raise
        finally:
            await attempts.aclose()
        telemetry.finish(_OK)

    async def _attempts(self, telemetry: CallTelemetry | None) -> AsyncGenerator[Any, None]:
        method = self._method
        try:
            controller = await method.controller(self._options.timeout, telemetry)
        except BaseException:
            if self._replay is not None:
                self._replay.close()
            raise
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
                    request = self._replay.attempt() if self._replay is not None else self._request
                    options = self._options.attempt(controller, method.policy)
                    send = method.callable_for(endpoint)
                    call = send_attempt(
                        attempt, telemetry, send, request, options, backoff_s=delay, reason=reason
                    )
                    self._attempt_call = call
                    async for response in call:
                        committed = True
                        yield response
                except grpc.RpcError as error:
                    committed = committed or (self._replay is not None and self._replay.overflowed)
                    outcome = outcome_of(error, time.monotonic() - started, committed=committed)
                    delay = end_attempt(controller, attempt, outcome, telemetry)
                    if delay is None or self._cancelled:
                        finish_call(controller, outcome.code, telemetry)
                        # typed: NotFoundError and still an AioRpcError
                        raise to_rpc_status_error(error) from None
                    reason = outcome.code.name
                    await asyncio.sleep(delay)
                    continue
                except BaseException:
                    # The caller stopped reading (aclose), was cancelled, or user code raised.
                    if call is not None and not call.done():
                        call.cancel()
                    controller.abandon_attempt(attempt)
                    raise
                outcome = AttemptOutcome(code=_OK, duration=time.monotonic() - started)
                end_attempt(controller, attempt, outcome, telemetry)
                finish_call(controller, _OK, telemetry)
                return
        finally:
            controller.release()
            if self._replay is not None:
                self._replay.close()


# -- multicallables --------------------------------------------------------------------------------------


class _UnaryUnary:
    def __init__(self, method: _Method) -> None:
        self._method = method

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> _UnaryResponseCall:
        options = _CallOptions(timeout, metadata, wait_for_ready, compression)
        return _UnaryResponseCall(self._method, request, options, None)


class _StreamUnary:
    def __init__(self, method: _Method) -> None:
        self._method = method

    def __call__(
        self,
        request_iterator: AsyncIterable[Any] | Iterable[Any] | None = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> _UnaryResponseCall:
        options = _CallOptions(timeout, metadata, wait_for_ready, compression)
        replay = RequestReplay(request_iterator, self._method.service.core.policy.max_buffered_request_bytes)
        return _UnaryResponseCall(self._method, None, options, replay)


class _UnaryStream:
    def __init__(self, method: _Method) -> None:
        self._method = method

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> _StreamResponseCall:
        options = _CallOptions(timeout, metadata, wait_for_ready, compression)
        return _StreamResponseCall(self._method, request, options, None)


class _StreamStream:
    def __init__(self, method: _Method) -> None:
        self._method = method

    def __call__(
        self,
        request_iterator: AsyncIterable[Any] | Iterable[Any] | None = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> _StreamResponseCall:
        options = _CallOptions(timeout, metadata, wait_for_ready, compression)
        replay = RequestReplay(request_iterator, self._method.service.core.policy.max_buffered_request_bytes)
        return _StreamResponseCall(self._method, None, options, replay)


class MeshChannel:
    """A channel to every passing instance of one service; use it like a ``grpc.aio.Channel``."""

    def __init__(self, service: AioService) -> None:
        self._service = service

    @property
    def service(self) -> str:
        """The service name."""
        return self._service.name

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> _UnaryUnary:
        """A unary-unary multicallable (raw bytes without serializers)."""
        return _UnaryUnary(
            _Method(self._service, method, "unary_unary", request_serializer, response_deserializer)
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> _UnaryStream:
        """A unary-stream multicallable."""
        return _UnaryStream(
            _Method(self._service, method, "unary_stream", request_serializer, response_deserializer)
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> _StreamUnary:
        """A stream-unary multicallable."""
        return _StreamUnary(
            _Method(self._service, method, "stream_unary", request_serializer, response_deserializer)
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> _StreamStream:
        """A stream-stream multicallable."""
        return _StreamStream(
            _Method(self._service, method, "stream_stream", request_serializer, response_deserializer)
        )

    async def channel_ready(self, timeout: float | None = DISCOVERY_WAIT) -> None:  # noqa: ASYNC109
        """Wait until the service's instances are known (the first Registry snapshot)."""
        if not await self._service.wait_synced(timeout):
            raise mesh_error(
                grpc.StatusCode.UNAVAILABLE, f"service '{self.service}': Registry watch not synced"
            )

    async def close(self, grace: float | None = None) -> None:
        """No-op: sub-channels belong to the Mesh and close with it."""

    async def __aenter__(self) -> MeshChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None
