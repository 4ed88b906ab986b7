"""Breaker permits on every exit path, and committed calls, against real servers (issue 15, items 2 and 4).

Each backend is a real gRPC server on port 0, registered with a real `rpcmesh up`, whose behaviour
the test switches between answering, failing, answering late and failing after response headers.
Where a cancel lands (a caller's timeout, a stream closed early, a hedge that loses) is drawn from
a seeded generator over several trials; the seed is in every assertion message (set
RPCMESH_FAULT_SEED to replay one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from rpcmesh.client import (
    BreakerPolicy,
    BreakerState,
    HedgingPolicy,
    Mesh,
    MeshPolicy,
    MethodPolicy,
    RetryPolicy,
    ServicePolicy,
    SyncMesh,
)
from rpcmesh.client.endpoints import ServiceCore
from tests.support.processes import ManagedProcess

SERVICE = "ctl"
UNARY = "/test.Ctl/Call"
STREAM = "/test.Ctl/Stream"
SEED = int(os.environ.get("RPCMESH_FAULT_SEED") or random.SystemRandom().randrange(2**32))


class Backend:
    """A real gRPC server whose behaviour the test sets: ok, fail, headers_then_fail; ``delay`` seconds."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.mode = "ok"
        self.delay = 0.0
        self.headers_pause = 0.0
        self.pushback_ms: str | None = None
        self.calls = 0
        self.started: list[float] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        handlers = {
            "Call": grpc.unary_unary_rpc_method_handler(self._call),
            "Stream": grpc.unary_stream_rpc_method_handler(self._stream),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Ctl", handlers),))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _begin(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls += 1
            self.started.append(time.monotonic())
        if self.pushback_ms is not None:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", self.pushback_ms),))
            self.pushback_ms = None  # once: the next call is served
            context.abort(grpc.StatusCode.UNAVAILABLE, "busy: come back later")
        if self.mode == "fail":
            context.abort(grpc.StatusCode.UNAVAILABLE, "backend failing")
        if self.mode == "headers_then_fail":
            context.send_initial_metadata((("x-sent", "headers"),))
            self._wait(context, self.headers_pause)
            context.abort(grpc.StatusCode.UNAVAILABLE, "failed after sending headers")

    @staticmethod
    def _wait(context: grpc.ServicerContext, seconds: float) -> None:
        end = time.monotonic() + seconds
        while context.is_active() and time.monotonic() < end:
            time.sleep(0.005)

    def _call(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._begin(context)
        self._wait(context, self.delay)
        return self.instance_id.encode()

    def _stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._begin(context)
        for _ in range(3):
            yield self.instance_id.encode()
            self._wait(context, self.delay)


@pytest.fixture
def backends(control_plane: tuple[ManagedProcess, str]) -> Iterator[Callable[[str], Backend]]:
    """Start backends registered with the control plane; all stopped after the test."""
    started: list[Backend] = []

    def start(instance_id: str) -> Backend:
        backend = Backend(instance_id)
        started.append(backend)
        with grpc.insecure_channel(control_plane[1]) as channel:
            registry_pb2_grpc.RegistryStub(channel).Register(
                registry_pb2.RegisterRequest(
                    instance=registry_pb2.Instance(
                        service=SERVICE, instance_id=instance_id, address=backend.address
                    ),
                    ttl=duration_pb2.Duration(seconds=3600),
                ),
                timeout=10,
            )
        return backend

    try:
        yield start
    finally:
        for backend in started:
            backend.server.stop(0).wait()


def breaker_policy(probes: int) -> BreakerPolicy:
    return BreakerPolicy(consecutive_failures=3, open_duration=0.5, half_open_probes=probes)


def states(breakers: dict[str, Any]) -> dict[str, BreakerState]:
    return {name: snapshot.state for name, snapshot in breakers.items()}


async def wait_state(mesh: Mesh, name: str, state: BreakerState, where: str) -> None:
    deadline = time.monotonic() + 10
    while mesh.breakers(SERVICE)[name].state is not state:
        assert time.monotonic() < deadline, f"{name} never became {state.value}; {where}"
        await asyncio.sleep(0.02)


def wait_state_sync(mesh: SyncMesh, name: str, state: BreakerState, where: str) -> None:
    deadline = time.monotonic() + 10
    while mesh.breakers(SERVICE)[name].state is not state:
        assert time.monotonic() < deadline, f"{name} never became {state.value}; {where}"
        time.sleep(0.02)


# -- item 2: a call cancelled by its caller during half-open gives its probe permits back -----------------


@pytest.mark.fault
async def test_caller_cancellations_in_half_open_leave_the_breakers_able_to_close(
    control_plane: tuple[ManagedProcess, str], backends: Callable[[str], Backend]
) -> None:
    backend = backends("b0")
    policy = ServicePolicy(
        method=MethodPolicy(retry=None), instance_breaker=breaker_policy(3), service_breaker=breaker_policy(3)
    )
    rng = random.Random(SEED)
    async with Mesh(control_plane[1], policy=MeshPolicy(default=policy)) as mesh:
        await mesh.wait_for_instances(SERVICE, 1)
        call = mesh.channel(SERVICE).unary_unary(UNARY)
        for trial in range(4):
            where = f"seed={SEED} trial={trial}"
            backend.mode, backend.delay = "fail", 0.0
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError):
                    await call(b"", timeout=5)
            await wait_state(mesh, f"service {SERVICE}", BreakerState.HALF_OPEN, where)
            backend.mode, backend.delay = "ok", 0.5
            cancels = [rng.uniform(0.0, 0.4) for _ in range(3)]
            for after in cancels:  # as many cancelled calls as there are probe permits
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(call(b"", timeout=5), after)
            backend.delay = 0.0
            for _ in range(6):
                assert await call(b"", timeout=5) == b"b0", f"{where} cancels={cancels}"
            assert set(states(mesh.breakers(SERVICE)).values()) == {BreakerState.CLOSED}, where
            assert [view.outstanding for view in mesh.endpoints(SERVICE)] == [0], where


@pytest.mark.fault
def test_sync_streams_closed_early_in_half_open_leave_the_breakers_able_to_close(
    control_plane: tuple[ManagedProcess, str], backends: Callable[[str], Backend]
) -> None:
    backend = backends("b0")
    policy = ServicePolicy(
        method=MethodPolicy(retry=None), instance_breaker=breaker_policy(2), service_breaker=breaker_policy(2)
    )
    rng = random.Random(SEED)
    with SyncMesh(control_plane[1], policy=MeshPolicy(default=policy)) as mesh:
        mesh.wait_for_instances(SERVICE, 1)
        stream = mesh.channel(SERVICE).unary_stream(STREAM)
        for trial in range(4):
            where = f"seed={SEED} trial={trial}"
            backend.mode, backend.delay = "fail", 0.0
            for _ in range(3):
                with pytest.raises(grpc.RpcError):
                    list(stream(b"", timeout=5))
            wait_state_sync(mesh, f"service {SERVICE}", BreakerState.HALF_OPEN, where)
            backend.mode, backend.delay = "ok", 0.5
            closes = [rng.uniform(0.0, 0.3) for _ in range(2)]
            for after in closes:  # the caller reads one response, then stops reading
                responses = stream(b"", timeout=5)
                assert next(responses) == b"b0", where
                time.sleep(after)
                responses.close()  # type: ignore[attr-defined]
            backend.delay = 0.0
            for _ in range(4):
                assert list(stream(b"", timeout=5)) == [b"b0"] * 3, f"{where} closes={closes}"
            assert set(states(mesh.breakers(SERVICE)).values()) == {BreakerState.CLOSED}, where
            assert [view.outstanding for view in mesh.endpoints(SERVICE)] == [0], where


# -- item 2: a hedge that loses gives its instance's probe permit back ------------------------------------


def hedged_policy() -> ServicePolicy:
    return ServicePolicy(
        method=MethodPolicy(idempotent=True, hedging=HedgingPolicy(max_attempts=2, delay=0.05)),
        instance_breaker=BreakerPolicy(consecutive_failures=2, open_duration=0.5, half_open_probes=1),
        service_breaker=None,
    )


@pytest.mark.fault
async def test_hedge_losers_in_half_open_do_not_keep_the_instance_ejected(
    control_plane: tuple[ManagedProcess, str], backends: Callable[[str], Backend]
) -> None:
    slow, _ = backends("slow"), backends("fast")
    rng = random.Random(SEED)
    async with Mesh(control_plane[1], policy=MeshPolicy(default=hedged_policy())) as mesh:
        await mesh.wait_for_instances(SERVICE, 2)
        call = mesh.channel(SERVICE).unary_unary(UNARY)
        name = f"instance {SERVICE}/slow"
        for trial in range(3):
            where = f"seed={SEED} trial={trial}"
            slow.mode, slow.delay = "fail", 0.0
            for _ in range(20):
                if mesh.breakers(SERVICE)[name].state is BreakerState.OPEN:
                    break
                assert await call(b"", timeout=5) == b"fast", where
            await wait_state(mesh, name, BreakerState.HALF_OPEN, where)
            slow.mode, slow.delay = "ok", rng.uniform(0.15, 0.6)  # every hedge to it loses
            for _ in range(4):
                assert await call(b"", timeout=5) == b"fast", f"{where} delay={slow.delay:.3f}"
            slow.delay = 0.0
            before = {view.instance_id: view.picks for view in mesh.endpoints(SERVICE)}
            for _ in range(25):
                await call(b"", timeout=5)
            after = {view.instance_id: view.picks for view in mesh.endpoints(SERVICE)}
            assert after["slow"] > before["slow"], f"{where}: the recovered instance got no pick"
            await wait_state(mesh, name, BreakerState.CLOSED, where)
            assert all(view.outstanding == 0 for view in mesh.endpoints(SERVICE)), where


@pytest.mark.fault
def test_sync_hedge_losers_in_half_open_do_not_keep_the_instance_ejected(
    control_plane: tuple[ManagedProcess, str], backends: Callable[[str], Backend]
) -> None:
    slow, _ = backends("slow"), backends("fast")
    rng = random.Random(SEED)
    with SyncMesh(control_plane[1], policy=MeshPolicy(default=hedged_policy())) as mesh:
        mesh.wait_for_instances(SERVICE, 2)
        call = mesh.channel(SERVICE).unary_unary(UNARY)
        name = f"instance {SERVICE}/slow"
        for trial in range(3):
            where = f"seed={SEED} trial={trial}"
            slow.mode, slow.delay = "fail", 0.0
            for _ in range(20):
                if mesh.breakers(SERVICE)[name].state is BreakerState.OPEN:
                    break
                assert call(b"", timeout=5) == b"fast", where
            wait_state_sync(mesh, name, BreakerState.HALF_OPEN, where)
            slow.mode, slow.delay = "ok", rng.uniform(0.15, 0.6)
            for _ in range(4):
                assert call(b"", timeout=5) == b"fast", f"{where} delay={slow.delay:.3f}"
            slow.delay = 0.0
            before = {view.instance_id: view.picks for view in mesh.endpoints(SERVICE)}
            for _ in range(25):
                call(b"", timeout=5)
            after = {view.instance_id: view.picks for view in mesh.endpoints(SERVICE)}
            assert after["slow"] > before["slow"], f"{where}: the recovered instance got no pick"
            wait_state_sync(mesh, name, BreakerState.CLOSED, where)
            assert all(view.outstanding == 0 for view in mesh.endpoints(SERVICE)), where


# -- item 4: once response headers arrived, the call is committed ----------------------------------------


def retrying_policy() -> MeshPolicy:
    method = MethodPolicy(idempotent=True, retry=RetryPolicy(max_attempts=3, initial_backoff=0.01))
    return MeshPolicy(default=ServicePolicy(method=method, instance_breaker=None, service_breaker=None))


async def test_a_failure_after_response_headers_is_not_retried(
    control_plane: tuple[ManagedProcess, str], backends: Callable[[str], Backend]
) -> None:
    backend = backends("b0")
    async with Mesh(control_plane[1], policy=retrying_policy()) as mesh:
        await mesh.wait_for_instances(SERVICE, 1)
        channel = mesh.channel(SERVICE)
        backend.mode = "fail"  # no headers: retried up to max_attempts
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(UNARY)(b"", timeout=5)
        assert backend.calls == 3
        backend.mode, backend.calls = "headers_then_fail", 0
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await channel.unary_unary(UNARY)(b"", timeout=5)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert backend.calls == 1
        # grpc.aio may report a stream's status before headers that came just ahead of it
        # (then they look absent): the server pauses between the two, as real work would.
        backend.calls, backend.headers_pause = 0, 0.05
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in channel.unary_stream(STREAM)(b"", timeout=5):
                pass
        assert backend.calls == 1


def test_sync_a_failure_after_response_headers_is_not_retried(
    control_plane: tuple[ManagedProcess, str], backends: Callable[[str], Backend]
) -> None:
    backend = backends("b0")
    with SyncMesh(control_plane[1], policy=retrying_policy()) as mesh:
        mesh.wait_for_instances(SERVICE, 1)
        channel = mesh.channel(SERVICE)
        backend.mode = "fail"
        with pytest.raises(grpc.RpcError):
            channel.unary_unary(UNARY)(b"", timeout=5)
        assert backend.calls == 3
        backend.mode, backend.calls = "headers_then_fail", 0
        with pytest.raises(grpc.RpcError) as failed:
            channel.unary_unary(UNARY)(b"", timeout=5)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert backend.calls == 1
        backend.calls = 0
        with pytest.raises(grpc.RpcError):
            list(channel.unary_stream(STREAM)(b"", timeout=5))
        assert backend.calls == 1


# -- the sync watch thread survives anything ---------------------------------------------------------------


def test_sync_watch_thread_logs_and_restarts_after_an_unexpected_error(
    control_plane: tuple[ManagedProcess, str],
    backends: Callable[[str], Backend],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backends("b0")
    real_apply = ServiceCore.apply
    failures = [RuntimeError("injected: applying a watch response failed")] * 2

    def failing_apply(self: ServiceCore, *args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return real_apply(self, *args, **kwargs)

    monkeypatch.setattr(ServiceCore, "apply", failing_apply)  # a fault inside the watch thread
    with caplog.at_level(logging.ERROR, logger="rpcmesh.client.sync"), SyncMesh(control_plane[1]) as mesh:
        assert [view.instance_id for view in mesh.wait_for_instances(SERVICE, 1, within=15)] == ["b0"]
        assert not failures
        assert sum("restarting it" in record.getMessage() for record in caplog.records) == 2
        assert mesh.channel(SERVICE).unary_unary(UNARY)(b"", timeout=5) == b"b0"


# -- item 6: hedging obeys a positive pushback ---------------------------------------------------------------


def pushback_policy() -> MeshPolicy:
    # The hedging delay is longer than the pushback: the second attempt can only come early
    # by skipping the pushback (before the fix, a non-fatal failure started it at once).
    method = MethodPolicy(idempotent=True, hedging=HedgingPolicy(max_attempts=2, delay=1.0))
    return MeshPolicy(default=ServicePolicy(method=method, instance_breaker=None, service_breaker=None))


async def test_a_hedge_waits_for_the_server_pushback(
    control_plane: tuple[ManagedProcess, str], backends: Callable[[str], Backend]
) -> None:
    backend = backends("b0")
    async with Mesh(control_plane[1], policy=pushback_policy()) as mesh:
        await mesh.wait_for_instances(SERVICE, 1)
        backend.pushback_ms = "300"
        assert await mesh.channel(SERVICE).unary_unary(UNARY)(b"", timeout=5) == b"b0"
        assert len(backend.started) == 2
        assert backend.started[1] - backend.started[0] >= 0.29  # not at once, as before the fix


def test_sync_a_hedge_waits_for_the_server_pushback(
    control_plane: tuple[ManagedProcess, str], backends: Callable[[str], Backend]
) -> None:
    backend = backends("b0")
    with SyncMesh(control_plane[1], policy=pushback_policy()) as mesh:
        mesh.wait_for_instances(SERVICE, 1)
        backend.pushback_ms = "300"
        assert mesh.channel(SERVICE).unary_unary(UNARY)(b"", timeout=5) == b"b0"
        assert len(backend.started) == 2
        assert backend.started[1] - backend.started[0] >= 0.29
