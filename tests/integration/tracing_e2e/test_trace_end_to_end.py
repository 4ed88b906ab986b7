"""Issue 7, item 7: one trace and one correlation id through calls, the Bus and a saga, at a real collector.

Real processes, each exporting OTLP to the collector this test starts: `rpcmesh up`
(Registry, Bus, SagaCoordinator), service A and service B (``service.py``, ServiceHosts),
subscriber C (``subscriber.py``, ``rpcmesh.bus.Subscriber``). This process is the client,
with a Mesh and a traced channel recording into its own telemetry handle.

Flows:

1. client → A → B; B's handler publishes on the Bus; C handles the message.
2. a 2-step saga started by the client: step ``call-a`` calls A (→ B → Bus → C),
   step ``call-b`` calls B (→ Bus → C).
3. the coordinator is killed (kill -9) between two attempts of a step; after the restart
   the remaining attempt's spans join the saga's original trace.

For each flow: every span of the trace shares one trace id, each span's parent is the
span that caused it (checked as the full chain from each leaf to the client's root
span), every span carries the client's correlation id, and no span with that id lies in
another trace.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from rpcmesh.v1 import saga_pb2, saga_pb2_grpc

from rpcmesh.client import Mesh, MeshPolicy, MethodPolicy, ServicePolicy
from rpcmesh.telemetry import (
    Telemetry,
    TelemetryConfig,
    aio_client_interceptors,
    setup_telemetry,
    use_correlation_id,
)
from tests.support.otlp_collector import CollectedSpan, OtlpCollector, running_collector
from tests.support.processes import ManagedProcess, python_env, rpcmesh_command

pytestmark = [pytest.mark.slow]

HERE = Path(__file__).parent
SERVICE = str(HERE / "service.py")
SUBSCRIBER = str(HERE / "subscriber.py")
ECHO = "/echo.v1.Echo/Echo"
ECHO_SPAN = "echo.v1.Echo/Echo"
START_SAGA = "rpcmesh.v1.SagaCoordinator/StartSaga"
TIMEOUT = 10.0

Link = tuple[str, str, str]  # (service, kind, span name)


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    with running_collector() as started:
        yield started


@pytest.fixture
def client_telemetry(collector: OtlpCollector) -> Iterator[Telemetry]:
    telemetry = setup_telemetry(
        TelemetryConfig(
            service_name="client", traces_exporters=("otlp",), otlp_traces_endpoint=collector.endpoint
        ),
        install=False,
        simple_span_processor=True,
    )
    try:
        yield telemetry
    finally:
        telemetry.shutdown()


def otel_env(collector: OtlpCollector, name: str) -> dict[str, str]:
    return python_env(
        {
            "OTEL_SERVICE_NAME": name,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
    )


class World:
    """The processes of one test; all killed at the end."""

    def __init__(self, tmp_path: Path, collector: OtlpCollector) -> None:
        self.tmp_path = tmp_path
        self.collector = collector
        self.procs: list[ManagedProcess] = []
        self.plane: ManagedProcess | None = None
        self.address = ""

    def spawn(self, args: list[str], name: str) -> ManagedProcess:
        proc = ManagedProcess(args, env=otel_env(self.collector, name))
        self.procs.append(proc)
        return proc

    def start_plane(self, name: str = "controlplane", port: str = "0") -> None:
        command = rpcmesh_command("up", "--port", port, "--data-dir", str(self.tmp_path / "data"))
        self.plane = self.spawn(command, name)
        self.address = self.plane.wait_for_address(timeout=30)

    def restart_plane(self, name: str) -> None:
        """Kill -9 the control plane and start it again on the same port (hosts keep its address)."""
        assert self.plane is not None
        self.plane.kill()
        port = self.address.rsplit(":", 1)[1]
        for _ in range(50):  # the port may linger for a moment after the kill
            try:
                self.start_plane(name, port)
                return
            except (RuntimeError, TimeoutError):
                assert self.plane is not None
                self.plane.kill()
        raise RuntimeError("control plane did not restart")

    def service(self, name: str, *args: str) -> ManagedProcess:
        return self.spawn([sys.executable, SERVICE, "--registry", self.address, "--name", name, *args], name)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()


@pytest.fixture
def world(tmp_path: Path, collector: OtlpCollector) -> Iterator[World]:
    started = World(tmp_path, collector)
    try:
        yield started
    finally:
        started.stop()


def by_id(spans: list[CollectedSpan]) -> dict[str, CollectedSpan]:
    return {s.span_id: s for s in spans}


def chain(span: CollectedSpan, index: dict[str, CollectedSpan]) -> list[Link]:
    """The span and its ancestors up to the root, leaf first; fails on a parent missing from the trace."""
    links: list[Link] = []
    current: CollectedSpan | None = span
    while current is not None:
        links.append((current.service, current.kind, current.name))
        if current.parent_span_id is None:
            return links
        parent = index.get(current.parent_span_id)
        assert parent is not None, f"parent of {links[-1]} is not in the trace"
        current = parent
    return links


def one_trace_with(spans: list[CollectedSpan], correlation: str) -> list[CollectedSpan]:
    """The spans carrying ``correlation``: all in one trace, which holds no span without it."""
    ours = [s for s in spans if s.attributes.get("rpcmesh.correlation_id") == correlation]
    assert ours, f"no span carries {correlation}"
    trace_ids = {s.trace_id for s in ours}
    assert len(trace_ids) == 1, trace_ids
    trace = [s for s in spans if s.trace_id in trace_ids]
    strangers = [(s.service, s.kind, s.name) for s in trace if s not in ours]
    assert not strangers, f"spans of the trace without the correlation id: {strangers}"
    return trace


def settled(spans: list[CollectedSpan], correlation: str, count: int) -> bool:
    """Whether ``count`` spans carry ``correlation`` and each one's parent has arrived."""
    ours = [s for s in spans if s.attributes.get("rpcmesh.correlation_id") == correlation]
    ids = {s.span_id for s in ours}
    return len(ours) >= count and all(s.parent_span_id is None or s.parent_span_id in ids for s in ours)


def leaves(trace: list[CollectedSpan], service: str, kind: str) -> list[CollectedSpan]:
    return [s for s in trace if s.service == service and s.kind == kind]


async def wait_spans(
    collector: OtlpCollector, predicate: Callable[[list[CollectedSpan]], bool], within: float = 30.0
) -> list[CollectedSpan]:
    return await asyncio.to_thread(collector.wait_for_spans, predicate, within)


def echo_step(
    name: str, service: str, *, base: bytes = b"", attempts: int = 0, backoff_ms: int = 50
) -> saga_pb2.SagaStep:
    step = saga_pb2.SagaStep(
        name=name,
        service=service,
        method=ECHO,
        no_compensation=True,
        request=saga_pb2.PayloadTemplate(base=base) if base else saga_pb2.PayloadTemplate(base_from="input"),
        retry=saga_pb2.RetryPolicy(max_attempts=attempts),
    )
    step.retry.initial_backoff.FromMilliseconds(backoff_ms)
    return step


async def start_saga(
    address: str, telemetry: Telemetry, definition: saga_pb2.SagaDefinition, message: str, correlation: str
) -> str:
    """StartSaga on a traced channel under ``correlation``; the saga's id."""
    interceptors = aio_client_interceptors(telemetry, target=address)
    async with grpc.aio.insecure_channel(address, interceptors=interceptors) as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        request = saga_pb2.StartSagaRequest(
            definition=definition, input=echo_pb2.EchoRequest(message=message).SerializeToString()
        )
        with use_correlation_id(correlation):
            started = await stub.StartSaga(request, timeout=TIMEOUT)
    return started.saga.saga_id


async def wait_saga(address: str, saga_id: str, within: float = 30.0) -> saga_pb2.Saga:
    """Poll GetSaga on a plain channel (no spans, no correlation id) until the saga ends."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    async with grpc.aio.insecure_channel(address) as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        while True:
            try:
                saga = (await stub.GetSaga(saga_pb2.GetSagaRequest(saga_id=saga_id), timeout=2)).saga
                if saga.state not in (saga_pb2.SAGA_STATE_RUNNING, saga_pb2.SAGA_STATE_COMPENSATING):
                    return saga
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            assert loop.time() < deadline, f"saga {saga_id} did not finish within {within}s"
            await asyncio.sleep(0.05)


def relay_chain(head: list[Link], topic: str) -> list[Link]:
    """Leaf-first chain from C's consumer span through B's publish and server spans, then ``head``."""
    return [
        ("c", "CONSUMER", f"process {topic}"),
        ("svc-b", "PRODUCER", f"publish {topic}"),
        ("svc-b", "SERVER", ECHO_SPAN),
        *head,
    ]


A_TO_B = [("svc-a", "CLIENT", ECHO_SPAN), ("svc-a", "INTERNAL", ECHO_SPAN), ("svc-a", "SERVER", ECHO_SPAN)]


def coordinator_call(plane: str, step: str) -> list[Link]:
    """The coordinator's spans of one step call: attempt, mesh call, step span (child first)."""
    return [
        (plane, "CLIENT", ECHO_SPAN),
        (plane, "INTERNAL", ECHO_SPAN),
        (plane, "INTERNAL", f"saga.step {step}"),
    ]


SAGA_ROOT = [("controlplane", "SERVER", START_SAGA), ("client", "CLIENT", START_SAGA)]


async def test_calls_bus_and_saga_share_one_trace_and_correlation_id(
    world: World, collector: OtlpCollector, client_telemetry: Telemetry
) -> None:
    topic = f"e2e.{uuid.uuid4().hex[:8]}"
    world.start_plane()
    starting = [
        world.service("svc-b", "--topic", topic),
        world.service("svc-a", "--downstream", "svc-b"),
        world.spawn(
            [sys.executable, SUBSCRIBER, "--address", world.address, "--topic", topic, "--group", "c"], "c"
        ),
    ]
    for proc in starting[:2]:
        proc.wait_for_address(timeout=30)
    starting[2].wait_for_line("ready", timeout=30)

    # Flow 1: client -> A -> B -> Bus -> C.
    call_correlation = f"call-{uuid.uuid4().hex[:12]}"
    policy = MeshPolicy(default=ServicePolicy(method=MethodPolicy(idempotent=True)))
    async with Mesh(world.address, policy=policy, telemetry=client_telemetry) as mesh:
        await mesh.wait_for_instances("svc-a", 1, within=20)
        with use_correlation_id(call_correlation):
            reply = await echo_pb2_grpc.EchoStub(mesh.channel("svc-a")).Echo(
                echo_pb2.EchoRequest(message="order-1"), timeout=TIMEOUT
            )
    assert reply.message == call_correlation  # B's handler saw the client's id

    # Flow 2: a 2-step saga whose steps call A (-> B -> Bus -> C) and B (-> Bus -> C).
    saga_correlation = f"saga-{uuid.uuid4().hex[:12]}"
    definition = saga_pb2.SagaDefinition(
        name="e2e", steps=[echo_step("call-a", "svc-a"), echo_step("call-b", "svc-b")]
    )
    saga_id = await start_saga(world.address, client_telemetry, definition, "order-2", saga_correlation)
    saga = await wait_saga(world.address, saga_id)
    assert saga.state == saga_pb2.SAGA_STATE_COMPLETED and saga.correlation_id == saga_correlation

    # Exporters flush every ~50 ms, in any order: wait until each flow's trace has all its spans.
    spans = await wait_spans(
        collector,
        lambda spans: settled(spans, call_correlation, 8) and settled(spans, saga_correlation, 17),
    )

    call_trace = one_trace_with(spans, call_correlation)
    index = by_id(call_trace)
    (consumer,) = leaves(call_trace, "c", "CONSUMER")
    expected = relay_chain(
        [*A_TO_B, ("client", "CLIENT", ECHO_SPAN), ("client", "INTERNAL", ECHO_SPAN)], topic
    )
    assert chain(consumer, index) == expected
    assert len(call_trace) == len(expected)  # nothing else in the trace

    saga_trace = one_trace_with(spans, saga_correlation)
    index = by_id(saga_trace)
    chains = sorted(chain(c, index) for c in leaves(saga_trace, "c", "CONSUMER"))
    via_a = relay_chain([*A_TO_B, *coordinator_call("controlplane", "call-a"), *SAGA_ROOT], topic)
    direct = relay_chain([*coordinator_call("controlplane", "call-b"), *SAGA_ROOT], topic)
    assert chains == sorted([via_a, direct])
    assert len(saga_trace) == len(via_a) + len(direct) - len(SAGA_ROOT)
    steps = {s.name: s for s in saga_trace if s.name.startswith("saga.step")}
    for name, step in steps.items():
        assert step.attributes["rpcmesh.saga.id"] == saga_id
        assert step.attributes["rpcmesh.saga.step"] == name.removeprefix("saga.step ")
        assert step.attributes["rpcmesh.saga.phase"] == "execute"
        assert step.attributes["rpcmesh.saga.attempt"] == 1
        assert step.attributes["rpcmesh.saga.outcome"] == "succeeded"

    # Handlers saw the ids: B answers with it, C prints it per message.
    subscriber = starting[2]
    subscriber.wait_for_line(f"received order-1 {call_correlation}", timeout=10)
    subscriber.wait_for_line(f"received order-2 {saga_correlation}", timeout=10)


async def test_steps_after_a_coordinator_kill_join_the_original_trace(
    world: World, collector: OtlpCollector, client_telemetry: Telemetry
) -> None:
    world.start_plane()
    starting = [world.service("svc-b", "--topic", "unused"), world.service("svc-a", "--downstream", "svc-b")]
    for proc in starting:
        proc.wait_for_address(timeout=30)

    # call-b fails its first attempt (UNAVAILABLE) and waits 3 s before the next: the kill lands there.
    second = echo_pb2.EchoRequest(message="quiet fail-once").SerializeToString()
    definition = saga_pb2.SagaDefinition(
        name="e2e-restart",
        steps=[
            echo_step("call-a", "svc-a"),
            echo_step("call-b", "svc-b", base=second, attempts=3, backoff_ms=3000),
        ],
    )
    correlation = f"restart-{uuid.uuid4().hex[:12]}"
    saga_id = await start_saga(world.address, client_telemetry, definition, "quiet", correlation)

    def failed_once(spans: list[CollectedSpan]) -> bool:
        return any(
            s.name == "saga.step call-b" and s.attributes.get("rpcmesh.saga.outcome") == "failed"
            for s in spans
        )

    await wait_spans(collector, failed_once)
    world.restart_plane("controlplane-restarted")
    saga = await wait_saga(world.address, saga_id)
    assert saga.state == saga_pb2.SAGA_STATE_COMPLETED
    assert saga.steps[1].attempts >= 2

    def resumed(spans: list[CollectedSpan]) -> bool:
        return any(
            s.service == "svc-b" and s.kind == "SERVER" and s.parent_span_id in restarted_ids(spans)
            for s in spans
        )

    def restarted_ids(spans: list[CollectedSpan]) -> set[str]:
        return {s.span_id for s in spans if s.service == "controlplane-restarted" and s.kind == "CLIENT"}

    spans = await wait_spans(collector, resumed)
    trace = one_trace_with(spans, correlation)
    index = by_id(trace)
    (root,) = [s for s in trace if s.parent_span_id is None]
    assert (root.service, root.kind, root.name) == ("client", "CLIENT", START_SAGA)

    # Before the kill: call-a (through A to B) and the failed first attempt of call-b.
    before = [s for s in trace if s.service == "controlplane" and s.name.startswith("saga.step")]
    assert sorted((s.name, s.attributes["rpcmesh.saga.outcome"]) for s in before) == [
        ("saga.step call-a", "succeeded"),
        ("saga.step call-b", "failed"),
    ]
    # After the restart: the remaining attempt, in the same trace, under the same StartSaga span.
    after = [s for s in trace if s.service == "controlplane-restarted" and s.name == "saga.step call-b"]
    assert after and after[-1].attributes["rpcmesh.saga.outcome"] == "succeeded"
    (start_server,) = [s for s in trace if s.service == "controlplane" and s.name == START_SAGA]
    assert {s.parent_span_id for s in [*before, *after]} == {start_server.span_id}
    for server in leaves(trace, "svc-b", "SERVER"):
        links = chain(server, index)
        assert links[-2:] == SAGA_ROOT
        assert links[1][0] in ("svc-a", "controlplane", "controlplane-restarted")
    resumed_servers = [
        s for s in leaves(trace, "svc-b", "SERVER") if s.parent_span_id in restarted_ids(trace)
    ]
    assert [chain(s, index) for s in resumed_servers][-1] == [
        ("svc-b", "SERVER", ECHO_SPAN),
        *coordinator_call("controlplane-restarted", "call-b"),
        *SAGA_ROOT,
    ]
