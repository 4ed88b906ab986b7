"""Group commit through two nodes sharing one PostgreSQL store (and one SQLite node).

Observable proof of batching: each storage counts the append transactions it
committed; concurrent appends through two real gRPC servers must take fewer
transactions than appends. Wrong expected revisions among them fail alone, and
``$all`` stays gap-free with contiguous revisions per stream.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from rpcmesh.v1 import eventstore_pb2 as pb
from rpcmesh.v1 import eventstore_pb2_grpc

from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.controlplane.eventstore.component import EventStoreComponent
from rpcmesh.controlplane.server import ControlPlane
from rpcmesh.errors import FailedPreconditionError, from_rpc_error

Stub = eventstore_pb2_grpc.EventStoreStub
WRITERS = 16
APPENDS_PER_WRITER = int(os.environ.get("RPCMESH_ES_GROUP_APPENDS", "12"))


class Node:
    def __init__(self, component: EventStoreComponent, stub: Stub) -> None:
        self.component = component
        self.stub = stub

    @property
    def transactions(self) -> int:
        return int(getattr(self.component.storage, "transactions"))  # noqa: B009


@pytest.fixture(params=["postgresql", "sqlite"])
async def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[Node]]:
    """Two nodes on one PostgreSQL database, or one node on SQLite (a file has one writer)."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        configs = [
            ControlPlaneConfig(port=0, data_dir=tmp_path / f"n{i}", store=url, grace=0.5) for i in range(2)
        ]
    else:
        configs = [ControlPlaneConfig(port=0, data_dir=tmp_path / "n0", grace=0.5)]
    started: list[tuple[ControlPlane, grpc.aio.Channel, Node]] = []
    try:
        for config in configs:
            component = EventStoreComponent(config)
            plane = ControlPlane(config, components=[component])
            address = await plane.start()
            channel = grpc.aio.insecure_channel(address)
            started.append((plane, channel, Node(component, eventstore_pb2_grpc.EventStoreStub(channel))))
        yield [node for _, _, node in started]
    finally:
        for plane, channel, _ in started:
            await channel.close()
            await plane.stop()


async def test_concurrent_appends_share_transactions_and_fail_alone(nodes: list[Node]) -> None:
    seed = int(os.environ.get("RPCMESH_ES_GROUP_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    # Each writer owns a stream and appends with optimistic concurrency; about one
    # append in five carries a stale expected revision and must fail by itself.
    stale = {(w, i) for w in range(WRITERS) for i in range(APPENDS_PER_WRITER) if rng.random() < 0.2}
    before = sum(node.transactions for node in nodes)

    async def writer(w: int) -> tuple[int, int]:
        stub = nodes[w % len(nodes)].stub
        revision, ok, refused = -1, 0, 0
        for i in range(APPENDS_PER_WRITER):
            request = pb.AppendToStreamRequest(
                stream=f"w-{w}", events=[pb.EventData(event_type="T", data=f"{w}.{i}".encode())]
            )
            if revision < 0:
                request.expected_state = pb.EXPECTED_STATE_NO_STREAM
            else:
                request.expected_revision = revision + 5 if (w, i) in stale else revision
            try:
                response = await stub.AppendToStream(request)
            except grpc.aio.AioRpcError as exc:
                assert isinstance(from_rpc_error(exc), FailedPreconditionError)
                assert (w, i) in stale and revision >= 0, f"seed {seed}"
                refused += 1
                continue
            assert (w, i) not in stale or revision < 0, f"seed {seed}"
            assert response.current_revision == revision + 1, f"seed {seed}"
            revision = response.current_revision
            ok += 1
        return ok, refused

    results = await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    appended = sum(ok for ok, _ in results)
    # Every request, refused or not, takes its place in a group (a stale one is judged there).
    requests = sum(ok + refused for ok, refused in results)
    transactions = sum(node.transactions for node in nodes) - before
    print(f"{transactions} transactions for {requests} appends ({appended} stored)")
    assert transactions < requests, f"{transactions} transactions for {requests} appends (seed {seed})"
    if len(nodes) > 1:
        assert all(node.transactions > 0 for node in nodes), f"seed {seed}"

    everything: list[pb.RecordedEvent] = []
    token = ""
    while True:
        page = await nodes[0].stub.ReadAll(pb.ReadAllRequest(page_size=1000, page_token=token))
        everything += page.events
        token = page.next_page_token
        if not token:
            break
    assert [e.position for e in everything] == list(range(1, appended + 1)), f"seed {seed}"
    for w in range(WRITERS):
        mine = [e for e in everything if e.stream == f"w-{w}"]
        assert [e.stream_revision for e in mine] == list(range(len(mine))), f"seed {seed}"
        assert len(mine) == results[w][0], f"seed {seed}"


async def test_writers_racing_on_the_same_streams_through_two_nodes(nodes: list[Node]) -> None:
    # Optimistic group commits that collide on a stream are judged again under the
    # lock: ANY appends all land, exact revisions keep failing alone, ids stay unique.
    async def writer(w: int) -> int:
        stub, refused = nodes[w % len(nodes)].stub, 0
        for i in range(8):
            stream = f"hot-{i % 2}"
            event = pb.EventData(event_id=f"{w}.{i}", event_type="T")
            request = pb.AppendToStreamRequest(stream=stream, events=[event])
            if i % 4 == 3:
                request.expected_revision = 0  # stale almost always
            else:
                request.expected_state = pb.EXPECTED_STATE_ANY
            try:
                await stub.AppendToStream(request)
            except grpc.aio.AioRpcError as exc:
                assert isinstance(from_rpc_error(exc), FailedPreconditionError)
                refused += 1
            retry = await stub.AppendToStream(
                pb.AppendToStreamRequest(stream=stream, events=[event], expected_state=pb.EXPECTED_STATE_ANY)
            )
            assert retry.appended in (0, 1)
        return refused

    await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    page = await nodes[-1].stub.ReadAll(pb.ReadAllRequest(page_size=1000))
    assert [e.position for e in page.events] == list(range(1, len(page.events) + 1))
    assert len(page.events) == WRITERS * 8  # every event once, refused ones by their retry
    for stream in ("hot-0", "hot-1"):
        mine = [e for e in page.events if e.stream == stream]
        assert [e.stream_revision for e in mine] == list(range(len(mine)))


@pytest.mark.parametrize("nodes", ["postgresql"], indirect=True)  # two nodes need a shared store
async def test_a_node_behind_on_a_stream_is_corrected_not_fooled(nodes: list[Node]) -> None:
    # A node judges appends with server-assigned ids from the revisions it remembers;
    # the other node moving the stream on must neither be overwritten nor gapped.
    a, b = nodes[0].stub, nodes[1].stub

    async def add(stub: Stub, **expected: int) -> pb.AppendToStreamResponse:
        request = pb.AppendToStreamRequest(stream="shared", events=[pb.EventData(event_type="T")], **expected)
        return await stub.AppendToStream(request)

    assert (await add(a, expected_state=pb.EXPECTED_STATE_NO_STREAM)).current_revision == 0
    assert (await add(a, expected_revision=0)).current_revision == 1  # a remembers 1
    assert (await add(b, expected_revision=1)).current_revision == 2
    assert (await add(b, expected_revision=2)).current_revision == 3
    assert (await add(a, expected_revision=3)).current_revision == 4  # a's memory said 1
    assert (await add(b, expected_state=pb.EXPECTED_STATE_ANY)).current_revision == 5
    assert (await add(a, expected_state=pb.EXPECTED_STATE_ANY)).current_revision == 6  # memory 4: refused key
    await add(b, expected_state=pb.EXPECTED_STATE_ANY)
    error = await expect_failed(add(a, expected_revision=6))  # memory 6, truth 7
    detail = error.detail(pb.WrongExpectedVersion)
    assert isinstance(detail, pb.WrongExpectedVersion) and detail.current_revision == 7
    read = await a.ReadStream(pb.ReadStreamRequest(stream="shared"))
    assert [e.stream_revision for e in read.events] == list(range(8))
    assert [e.position for e in read.events] == list(range(1, 9))


async def expect_failed(call: object) -> FailedPreconditionError:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        error = from_rpc_error(exc)
        assert isinstance(error, FailedPreconditionError)
        return error
    raise AssertionError("expected FAILED_PRECONDITION")
