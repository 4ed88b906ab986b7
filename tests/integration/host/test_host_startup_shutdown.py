"""A ServiceHost process: one-line start-up errors, a graceful SIGTERM, a second signal exits at once.

Against the real `examples/echo/server.py` (a ServiceHost registered with a real `rpcmesh up`),
plus in-process hosts where the point is the host's own API (``wait()``, a failed ``start()``).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest
from echo.servicer import EchoServicer
from echo.v1 import echo_pb2, echo_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rpcmesh.host import ServiceHost, ServiceHostConfig, StartupError
from rpcmesh.security import SecuritySettings, ServerTlsConfig
from tests.support.processes import ROOT, ManagedProcess, python_env, rpcmesh_command

ECHO = str(ROOT / "examples" / "echo" / "server.py")
# Trial t of a fault test draws from random.Random(SEED + t); set RPCMESH_FAULT_SEED to replay.
SEED = int(os.environ.get("RPCMESH_FAULT_SEED", "20261204"))


def run_echo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the echo server to its end (it is expected not to start)."""
    return subprocess.run(
        [sys.executable, ECHO, "--registry", "127.0.0.1:1", *args],
        capture_output=True,
        text=True,
        env=python_env(env),
        timeout=60,
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1, (result.returncode, result.stderr, result.stdout)
    assert lines[0].startswith("echo: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "echo stopped" not in result.stdout


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("host-certs") / "certs"
    subprocess.run(
        rpcmesh_command("certs", str(folder), "--client", "alice"),
        capture_output=True,
        env=python_env(),
        timeout=60,
        check=True,
    )
    return folder


def test_port_in_use_is_one_line_naming_the_port() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert_one_line(run_echo("--port", str(port)), f"127.0.0.1:{port}", "in use")


def test_certificate_and_key_mismatch_is_one_line_naming_both(certs: Path) -> None:
    cert, key = certs / "server.crt", certs / "client-alice.key"
    result = run_echo(env={"RPCMESH_TLS_CERT": str(cert), "RPCMESH_TLS_KEY": str(key)})
    assert_one_line(result, str(cert), str(key), "do not match")


def test_missing_certificate_is_one_line_naming_it(certs: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.crt"
    result = run_echo(env={"RPCMESH_TLS_CERT": str(missing), "RPCMESH_TLS_KEY": str(certs / "server.key")})
    assert_one_line(result, str(missing))


async def test_a_failed_start_stops_what_it_started() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        host = ServiceHost(
            ServiceHostConfig(service="echo", registry="127.0.0.1:1", port=port, register=False)
        )
        host.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, EchoServicer("e"))
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            await host.start()
        await asyncio.wait_for(host.wait(), 5)  # a failed start counts as stopped

    certs_folder = ROOT / "no-such-folder"
    bad = SecuritySettings(
        tls=ServerTlsConfig(cert_file=certs_folder / "x.crt", key_file=certs_folder / "x.key")
    )
    host = ServiceHost(
        ServiceHostConfig(service="echo", registry="127.0.0.1:1", register=False, security=bad)
    )
    with pytest.raises(StartupError, match=r"no-such-folder/x\.(crt|key)"):
        await host.start()


class Gate(echo_pb2_grpc.EchoServicer):
    """Answers each call once ``release`` is set; ``entered`` tells that a call is in the handler."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext
    ) -> echo_pb2.EchoResponse:
        self.entered.set()
        await self.release.wait()
        return echo_pb2.EchoResponse(message=request.message)


async def test_cancelling_wait_does_not_cut_the_grace_period() -> None:
    host = ServiceHost(ServiceHostConfig(service="echo", registry="127.0.0.1:1", register=False))
    gate = Gate()
    host.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, gate)
    address = await host.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(message="kept"), timeout=30)
            await asyncio.wait_for(gate.entered.wait(), 10)
            waiter = asyncio.create_task(host.wait())
            await asyncio.sleep(0)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            stopping = asyncio.create_task(host.stop(grace=30))
            await asyncio.sleep(0.2)
            gate.release.set()
            await asyncio.wait_for(stopping, 30)
            reply = await call
            assert reply.message == "kept"
            await asyncio.wait_for(host.wait(), 5)
    finally:
        gate.release.set()
        await host.stop(grace=0)


def start_echo_process(registry: str, *args: str) -> tuple[ManagedProcess, str]:
    proc = ManagedProcess([sys.executable, ECHO, "--registry", registry, *args])
    try:
        address = proc.wait_for_address()
    except BaseException:
        proc.kill()
        raise
    return proc, address


async def wait_exit(proc: ManagedProcess, within: float) -> int | None:
    try:
        return await asyncio.to_thread(proc.proc.wait, within)
    except subprocess.TimeoutExpired:
        return None


async def in_flight(stub: echo_pb2_grpc.EchoStub, delays_ms: list[int]) -> list[asyncio.Task[str]]:
    """Start one unary call per delay and make sure the server has read them all.

    The calls share one HTTP/2 connection: once a later call is answered, the server has read
    every earlier one.
    """

    async def call(delay_ms: int) -> str:
        request = echo_pb2.EchoRequest(message=str(delay_ms), behaviour=echo_pb2.Behaviour(delay_ms=delay_ms))
        return (await stub.Echo(request, timeout=60)).message

    tasks = [asyncio.create_task(call(delay)) for delay in delays_ms]
    await asyncio.sleep(0)
    await stub.Echo(echo_pb2.EchoRequest(message="probe"), timeout=30)
    return tasks


@pytest.mark.fault
@pytest.mark.slow
async def test_sigterm_at_a_random_moment_lets_in_flight_calls_finish(
    control_plane: tuple[ManagedProcess, str],
) -> None:
    registry = control_plane[1]
    for trial in range(3):
        seed = SEED + trial
        rng = random.Random(seed)
        delays = [rng.randint(300, 2500) for _ in range(rng.randint(3, 8))]
        wait_before_signal = rng.uniform(0.0, 0.3)
        sig = rng.choice([signal.SIGTERM, signal.SIGINT])
        trial_info = (
            f"RPCMESH_FAULT_SEED={SEED} trial={trial} delays_ms={delays} "
            f"{sig.name} after {wait_before_signal:.2f}s"
        )
        proc, address = start_echo_process(registry, "--instance-id", f"s{trial}", "--grace", "15")
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = echo_pb2_grpc.EchoStub(channel)
                calls = await in_flight(stub, delays)
                await asyncio.sleep(wait_before_signal)
                signalled = time.monotonic()
                proc.signal(sig)
                results = await asyncio.gather(*calls, return_exceptions=True)
                assert results == [str(d) for d in delays], f"{trial_info}: {results}\n{proc.output()}"
                code = await wait_exit(proc, 15.0 + 5.0)
                took = time.monotonic() - signalled
                assert code == 0, f"{trial_info}: exit code {code} after {took:.1f}s\n{proc.output()}"
                assert "echo stopped" in proc.output(), f"{trial_info}\n{proc.output()}"
        finally:
            proc.kill()


@pytest.mark.fault
async def test_a_second_signal_exits_at_once(control_plane: tuple[ManagedProcess, str]) -> None:
    registry = control_plane[1]
    for trial in range(2):
        seed = SEED + trial
        rng = random.Random(seed)
        first, second = (
            rng.choice([signal.SIGTERM, signal.SIGINT]),
            rng.choice([signal.SIGTERM, signal.SIGINT]),
        )
        trial_info = f"RPCMESH_FAULT_SEED={SEED} trial={trial} first={first.name} second={second.name}"
        proc, address = start_echo_process(registry, "--instance-id", f"x{seed}", "--grace", "60")
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                (call,) = await in_flight(echo_pb2_grpc.EchoStub(channel), [60_000])
                proc.signal(first)
                # The stop has begun once health says NOT_SERVING (or the port no longer answers).
                health = health_pb2_grpc.HealthStub(channel)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    try:
                        status = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() is grpc.StatusCode.UNAVAILABLE:
                            break  # the server no longer accepts calls: it is stopping
                        continue
                    if status.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                    await asyncio.sleep(0.05)
                else:
                    pytest.fail(f"{trial_info}: the first signal did not start the stop\n{proc.output()}")
                assert proc.proc.poll() is None, (
                    f"{trial_info}: exited although a call had 60 s\n{proc.output()}"
                )
                proc.signal(second)
                code = await wait_exit(proc, 10.0)
                assert code == 128 + second, f"{trial_info}: exit code {code}\n{proc.output()}"
                assert f"echo: {second.name} during shutdown; exiting at once" in proc.output(), trial_info
                call.cancel()
        finally:
            proc.kill()
