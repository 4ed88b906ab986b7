"""EventStore behaviour over gRPC, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from rpcmesh.v1 import eventstore_pb2 as pb
from rpcmesh.v1 import eventstore_pb2_grpc

from rpcmesh.errors import FailedPreconditionError, InvalidArgumentError, from_rpc_error

Stub = eventstore_pb2_grpc.EventStoreStub


def ev(event_type: str = "Thing", event_id: str = "", data: bytes = b"x") -> pb.EventData:
    return pb.EventData(event_id=event_id, event_type=event_type, data=data, metadata={"traceparent": "t"})


async def append(
    stub: Stub,
    stream: str,
    events: list[pb.EventData],
    *,
    state: int | None = None,
    revision: int | None = None,
) -> pb.AppendToStreamResponse:
    request = pb.AppendToStreamRequest(stream=stream, events=events)
    if revision is not None:
        request.expected_revision = revision
    else:
        request.expected_state = state if state is not None else pb.EXPECTED_STATE_ANY
    return await stub.AppendToStream(request)


async def expect_error(awaitable: object) -> Exception:
    try:
        await awaitable  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return from_rpc_error(exc)
    raise AssertionError("expected an error")


async def test_append_and_read_forwards(eventstore: Stub) -> None:
    first = await append(eventstore, "order-1", [ev("A"), ev("B")], state=pb.EXPECTED_STATE_NO_STREAM)
    assert (first.current_revision, first.appended) == (1, 2)
    second = await append(eventstore, "order-1", [ev("C")], revision=1)
    assert second.current_revision == 2
    assert second.position == first.position + 1
    read = await eventstore.ReadStream(pb.ReadStreamRequest(stream="order-1"))
    assert [e.event_type for e in read.events] == ["A", "B", "C"]
    assert [e.stream_revision for e in read.events] == [0, 1, 2]
    assert read.events[0].position >= 1
    assert read.events[0].metadata["traceparent"] == "t"
    assert read.current_revision == 2
    assert read.events[0].event_id  # server-assigned


async def test_wrong_expected_version_carries_current_revision(eventstore: Stub) -> None:
    await append(eventstore, "s", [ev()])
    error = await expect_error(append(eventstore, "s", [ev()], revision=5))
    assert isinstance(error, FailedPreconditionError)
    detail = error.detail(pb.WrongExpectedVersion)
    assert isinstance(detail, pb.WrongExpectedVersion)
    assert (detail.stream, detail.current_revision) == ("s", 0)
    error = await expect_error(append(eventstore, "s", [ev()], state=pb.EXPECTED_STATE_NO_STREAM))
    assert isinstance(error, FailedPreconditionError)
    error = await expect_error(append(eventstore, "absent", [ev()], state=pb.EXPECTED_STATE_STREAM_EXISTS))
    detail = error.detail(pb.WrongExpectedVersion)  # type: ignore[attr-defined]
    assert isinstance(detail, pb.WrongExpectedVersion)
    assert detail.current_revision == -1
    read = await eventstore.ReadStream(pb.ReadStreamRequest(stream="s"))
    assert len(read.events) == 1  # nothing changed


async def test_event_ids_are_not_stored_twice(eventstore: Stub) -> None:
    await append(eventstore, "d", [ev(event_id="e1"), ev(event_id="e2")])
    again = await append(
        eventstore, "d", [ev(event_id="e1"), ev(event_id="e2")], state=pb.EXPECTED_STATE_NO_STREAM
    )
    assert again.appended == 0  # a retried append (any mode) succeeds without storing again
    other = await append(eventstore, "other", [ev(event_id="e1")])
    assert other.appended == 1  # dedup is per stream
    error = await expect_error(append(eventstore, "d", [ev(event_id="e3"), ev(event_id="e3")]))
    assert isinstance(error, InvalidArgumentError)
    assert error.message.startswith("events[1].event_id:"), error.message


async def test_a_retry_returns_the_original_revision_and_position(eventstore: Stub) -> None:
    # issue 18 item 4: the retry of (rev 1, pos N) came back as the stream's current
    # (rev 2, pos N+1), and N+1 was someone else's event.
    first = await append(
        eventstore, "r", [ev(event_id="a"), ev(event_id="b")], state=pb.EXPECTED_STATE_NO_STREAM
    )
    later = await append(eventstore, "r", [ev(event_id="c")], revision=1)
    await append(eventstore, "elsewhere", [ev()])
    for kwargs in (
        {"state": pb.EXPECTED_STATE_NO_STREAM},
        {"state": pb.EXPECTED_STATE_ANY},
        {"state": pb.EXPECTED_STATE_STREAM_EXISTS},
    ):
        retry = await append(eventstore, "r", [ev(event_id="a"), ev(event_id="b")], **kwargs)  # type: ignore[arg-type]
        assert (retry.current_revision, retry.position, retry.appended) == (
            first.current_revision,
            first.position,
            0,
        ), kwargs
    retry = await append(eventstore, "r", [ev(event_id="c")], revision=1)
    assert (retry.current_revision, retry.position, retry.appended) == (2, later.position, 0)
    prefix = await append(eventstore, "r", [ev(event_id="a")], state=pb.EXPECTED_STATE_NO_STREAM)
    assert (prefix.current_revision, prefix.position) == (0, first.position - 1)
    # All stored, but not where the exact expected revision puts them: not a retry.
    error = await expect_error(append(eventstore, "r", [ev(event_id="c")], revision=0))
    assert isinstance(error, FailedPreconditionError)
    error = await expect_error(append(eventstore, "r", [ev(event_id="b"), ev(event_id="a")]))
    assert isinstance(error, FailedPreconditionError)  # stored, but in another order
    read = await eventstore.ReadStream(pb.ReadStreamRequest(stream="r"))
    assert [e.event_id for e in read.events] == ["a", "b", "c"]


async def test_a_partly_duplicate_batch_is_refused_whole(eventstore: Stub) -> None:
    await append(eventstore, "p", [ev(event_id="a"), ev(event_id="b")])
    head = (await eventstore.ReadAll(pb.ReadAllRequest())).last_position
    for kwargs in (
        {"state": pb.EXPECTED_STATE_ANY},
        {"state": pb.EXPECTED_STATE_STREAM_EXISTS},
        {"revision": 1},
    ):
        error = await expect_error(
            append(eventstore, "p", [ev(event_id="b"), ev(event_id="new")], **kwargs)  # type: ignore[arg-type]
        )
        assert isinstance(error, FailedPreconditionError), kwargs
        detail = error.detail(pb.WrongExpectedVersion)
        assert isinstance(detail, pb.WrongExpectedVersion)
        assert (detail.stream, detail.current_revision, list(detail.stored_event_ids)) == ("p", 1, ["b"])
    read = await eventstore.ReadStream(pb.ReadStreamRequest(stream="p"))
    assert [e.event_id for e in read.events] == ["a", "b"]  # nothing of it was stored
    assert (await eventstore.ReadAll(pb.ReadAllRequest())).last_position == head


async def test_read_stream_paginates_both_ways(eventstore: Stub) -> None:
    await append(eventstore, "p", [ev(data=bytes([i])) for i in range(25)])
    seen: list[int] = []
    token = ""
    while True:
        page = await eventstore.ReadStream(pb.ReadStreamRequest(stream="p", page_size=10, page_token=token))
        seen += [e.stream_revision for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(range(25))
    back: list[int] = []
    token = ""
    while True:
        page = await eventstore.ReadStream(
            pb.ReadStreamRequest(
                stream="p",
                from_revision=-1,
                direction=pb.READ_DIRECTION_BACKWARDS,
                page_size=7,
                page_token=token,
            )
        )
        back += [e.stream_revision for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert back == list(reversed(range(25)))
    middle = await eventstore.ReadStream(
        pb.ReadStreamRequest(stream="p", from_revision=3, direction=pb.READ_DIRECTION_BACKWARDS)
    )
    assert [e.stream_revision for e in middle.events] == [3, 2, 1, 0]
    missing = await eventstore.ReadStream(pb.ReadStreamRequest(stream="nope"))
    assert (len(missing.events), missing.current_revision) == (0, -1)


async def test_read_all_filters_and_pages(eventstore: Stub) -> None:
    await append(eventstore, "order-1", [ev("Placed"), ev("Paid")])
    await append(eventstore, "user-1", [ev("Created")])
    await append(eventstore, "order-2", [ev("Placed")])
    await append(eventstore, "orders", [ev("Other")])
    everything = await eventstore.ReadAll(pb.ReadAllRequest())
    assert [e.position for e in everything.events] == list(range(1, 6))
    assert everything.last_position == 5
    placed = await eventstore.ReadAll(pb.ReadAllRequest(filter=pb.ReadAllFilter(event_types=["Placed"])))
    assert [e.stream for e in placed.events] == ["order-1", "order-2"]
    orders = await eventstore.ReadAll(pb.ReadAllRequest(filter=pb.ReadAllFilter(stream_prefixes=["order-"])))
    assert [e.event_type for e in orders.events] == ["Placed", "Paid", "Placed"]
    both = await eventstore.ReadAll(
        pb.ReadAllRequest(
            filter=pb.ReadAllFilter(event_types=["Placed", "Created"], stream_prefixes=["user"])
        )
    )
    assert [e.stream for e in both.events] == ["user-1"]
    two_prefixes = await eventstore.ReadAll(
        pb.ReadAllRequest(filter=pb.ReadAllFilter(stream_prefixes=["user", "orders"]))
    )
    assert [e.stream for e in two_prefixes.events] == ["user-1", "orders"]
    positions: list[int] = []
    token = ""
    while True:
        page = await eventstore.ReadAll(pb.ReadAllRequest(from_position=2, page_size=2, page_token=token))
        positions += [e.position for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert positions == [2, 3, 4, 5]


async def test_bad_input_names_the_field(eventstore: Stub) -> None:
    cases = [
        (pb.AppendToStreamRequest(stream="", expected_state=pb.EXPECTED_STATE_ANY), "stream"),
        (pb.AppendToStreamRequest(stream="s"), "expected_state"),
        (pb.AppendToStreamRequest(stream="s", expected_revision=-3), "expected_revision"),
        (
            pb.AppendToStreamRequest(
                stream="s", expected_state=pb.EXPECTED_STATE_ANY, events=[pb.EventData(event_type="")]
            ),
            "events[0].event_type",
        ),
        (
            pb.AppendToStreamRequest(
                stream="s",
                expected_state=pb.EXPECTED_STATE_ANY,
                events=[pb.EventData(event_type="T", metadata={"k": "v\x00"})],
            ),
            "events[0].metadata['k']",
        ),
    ]
    for request, field in cases:
        error = await expect_error(eventstore.AppendToStream(request))
        assert isinstance(error, InvalidArgumentError)
        assert error.message.startswith(field + ":"), error.message
    error = await expect_error(eventstore.ReadStream(pb.ReadStreamRequest(stream="s", page_token="zzz")))
    assert error.message.startswith("page_token:")  # type: ignore[attr-defined]
    error = await expect_error(eventstore.ReadAll(pb.ReadAllRequest(page_size=-1)))
    assert error.message.startswith("page_size:")  # type: ignore[attr-defined]
    error = await expect_error(
        eventstore.ReadAll(pb.ReadAllRequest(filter=pb.ReadAllFilter(stream_prefixes=[""])))
    )
    assert error.message.startswith("filter.stream_prefixes[0]:")  # type: ignore[attr-defined]
    read = await eventstore.ReadAll(pb.ReadAllRequest())
    assert not read.events  # nothing was stored


async def test_subscribe_to_stream_catches_up_then_goes_live_and_resumes(eventstore: Stub) -> None:
    await append(eventstore, "live", [ev("A"), ev("B")])
    call = eventstore.SubscribeToStream(pb.SubscribeToStreamRequest(stream="live", after_revision=-1))
    got: list[int] = []
    caught_up = False
    async for message in call:
        got += [e.stream_revision for e in message.events]
        if message.caught_up and not caught_up:
            caught_up = True
            assert got == [0, 1]
            await append(eventstore, "live", [ev("C")])
            await append(eventstore, "elsewhere", [ev("X")])
        if got == [0, 1, 2]:
            break
    call.cancel()
    resumed = eventstore.SubscribeToStream(pb.SubscribeToStreamRequest(stream="live", after_revision=1))
    async for message in resumed:
        assert [e.stream_revision for e in message.events] == [2]
        break
    resumed.cancel()


async def test_subscribe_to_all_filters_with_checkpoints(eventstore: Stub) -> None:
    await append(eventstore, "a-1", [ev("Keep"), ev("Drop")])
    call = eventstore.SubscribeToAll(pb.SubscribeToAllRequest(filter=pb.ReadAllFilter(event_types=["Keep"])))
    kept: list[int] = []
    last_checkpoint = 0
    async for message in call:
        kept += [e.position for e in message.events]
        assert message.checkpoint >= last_checkpoint
        last_checkpoint = message.checkpoint
        if message.caught_up and len(kept) == 1:
            assert last_checkpoint == 2
            await append(eventstore, "a-2", [ev("Drop"), ev("Keep")])
        if len(kept) == 2:
            break
    call.cancel()
    assert kept == [1, 4]
    resumed = eventstore.SubscribeToAll(pb.SubscribeToAllRequest(after_position=1))
    async for message in resumed:
        assert [e.position for e in message.events] == [2, 3, 4]
        break
    resumed.cancel()


async def test_concurrent_writers_at_the_same_expected_version(eventstore: Stub) -> None:
    await append(eventstore, "race", [ev()])

    async def writer(index: int) -> bool:
        try:
            await append(eventstore, "race", [ev(f"W{index}")], revision=0)
        except grpc.aio.AioRpcError as exc:
            assert isinstance(from_rpc_error(exc), FailedPreconditionError)
            return False
        return True

    results = await asyncio.gather(*(writer(i) for i in range(8)))
    assert sum(results) == 1
    read = await eventstore.ReadStream(pb.ReadStreamRequest(stream="race"))
    assert len(read.events) == 2


@pytest.mark.parametrize("count", [300])
async def test_many_concurrent_appends_get_distinct_ordered_positions(eventstore: Stub, count: int) -> None:
    # Bounded: the control plane caps concurrent streams per connection.
    gate = asyncio.Semaphore(32)

    async def one(i: int) -> pb.AppendToStreamResponse:
        async with gate:
            return await append(eventstore, f"s-{i % 7}", [ev(), ev()])

    results = await asyncio.gather(*(one(i) for i in range(count)))
    positions = sorted(r.position for r in results)
    assert positions == list(range(2, 2 * count + 1, 2))
    everything: list[pb.RecordedEvent] = []
    token = ""
    while True:
        page = await eventstore.ReadAll(pb.ReadAllRequest(page_size=1000, page_token=token))
        everything += page.events
        token = page.next_page_token
        if not token:
            break
    for stream in {e.stream for e in everything}:
        revisions = [e.stream_revision for e in everything if e.stream == stream]
        assert revisions == list(range(len(revisions)))
