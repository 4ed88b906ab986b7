"""Operator paths on dead letters, on both backends: purge with a reason, and a range (also by CLI).

Four messages are terminated into group ``g``'s dead letters; purge and replay
then select them by sequences, a range or all. Bad selections answer
INVALID_ARGUMENT naming the field (or NOT_FOUND) and delete nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

import grpc
import grpc.aio
import pytest
from rpcmesh.v1 import bus_pb2

from rpcmesh.cli.main import main
from tests.integration.bus.conftest import BusHandle
from tests.integration.bus.streams import RawSubscriber, options


async def dead_letters(bus: BusHandle, topic: str) -> list[int]:
    listed = await bus.stub.ListDeadLetters(bus_pb2.ListDeadLettersRequest(topic=topic, group="g"))
    return [d.dead_letter_sequence for d in listed.dead_letters]


async def four_dead(bus: BusHandle, topic: str) -> RawSubscriber:
    messages = [bus_pb2.BusMessage(payload=f"m{i}".encode()) for i in range(4)]
    await bus.stub.Publish(bus_pb2.PublishRequest(topic=topic, messages=messages))
    sub = RawSubscriber(bus.stub, options(topic))
    await sub.opened()
    sub.term(await sub.receive(4), "bad payload")
    for _ in range(200):
        if len(await dead_letters(bus, topic)) == 4:
            return sub
        await asyncio.sleep(0.05)
    raise AssertionError(f"dead letters: {await dead_letters(bus, topic)}")


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_purge_and_replay_by_range_with_precise_errors(bus: BusHandle) -> None:
    topic = bus.topic("ops")
    sub = await four_dead(bus, topic)
    try:
        seqs = await dead_letters(bus, topic)
        first = seqs[0]

        def purge(**kwargs: object) -> bus_pb2.PurgeDeadLettersRequest:
            return bus_pb2.PurgeDeadLettersRequest(topic=topic, group="g", **kwargs)  # type: ignore[arg-type]

        bad = [
            (purge(all=True), "reason"),
            (purge(all=True, reason="  "), "reason"),
            (purge(reason="why"), "all"),
            (purge(all=True, dead_letter_sequences=[first], reason="why"), "all"),
            (purge(range=bus_pb2.DeadLetterRange(first=0), reason="why"), "range.first"),
            (purge(range=bus_pb2.DeadLetterRange(first=3, last=2), reason="why"), "range.last"),
            (purge(dead_letter_sequences=[999], reason="why"), "dead_letter_sequences[0]"),
        ]
        for request, field in bad:
            error = await refused(bus.stub.PurgeDeadLetters(request))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, error.details())
            assert field in (error.details() or ""), (field, error.details())
        group_error = await refused(
            bus.stub.PurgeDeadLetters(
                bus_pb2.PurgeDeadLettersRequest(topic=topic, group="nope", all=True, reason="x")
            )
        )
        assert group_error.code() == grpc.StatusCode.NOT_FOUND
        assert await dead_letters(bus, topic) == seqs  # nothing deleted

        # The middle two by range.
        done = await bus.stub.PurgeDeadLetters(
            purge(range=bus_pb2.DeadLetterRange(first=seqs[1], last=seqs[2]), reason="known bad batch")
        )
        assert done.purged == 2
        assert await dead_letters(bus, topic) == [seqs[0], seqs[3]]
        # A purged sequence named again: NOT_FOUND, nothing deleted.
        gone = await refused(
            bus.stub.PurgeDeadLetters(purge(dead_letter_sequences=[seqs[0], seqs[1]], reason="x"))
        )
        assert gone.code() == grpc.StatusCode.NOT_FOUND
        assert await dead_letters(bus, topic) == [seqs[0], seqs[3]]

        # Replay an open-ended range: only the last one comes back.
        replayed = await bus.stub.ReplayDeadLetters(
            bus_pb2.ReplayDeadLettersRequest(
                topic=topic, group="g", range=bus_pb2.DeadLetterRange(first=seqs[3])
            )
        )
        assert replayed.replayed == 1
        (again,) = await sub.receive(1)
        assert again.message.payload == b"m3"
        sub.ack([again])
        assert await dead_letters(bus, topic) == [seqs[0]]

        done = await bus.stub.PurgeDeadLetters(purge(all=True, reason="drained"))
        assert done.purged == 1
        assert await dead_letters(bus, topic) == []
    finally:
        await sub.close()


def cli(address: str, *args: str) -> tuple[int, str, str]:
    """Run one rpcmesh command (in a worker thread: the Bus runs on this loop)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([*args, "--target", address, "--timeout", "20"])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


async def test_cli_purge_with_reason_and_replay_a_range(sqlite_bus: BusHandle) -> None:
    bus = sqlite_bus
    topic = bus.topic("cli")
    sub = await four_dead(bus, topic)
    try:
        s = [str(seq) for seq in await dead_letters(bus, topic)]
        code, _, err = await asyncio.to_thread(cli, bus.address, "dead-letters", "purge", topic, "g", "--all")
        assert code == 2 and "--reason" in err, err
        code, _, err = await asyncio.to_thread(
            cli, bus.address, "dead-letters", "purge", topic, "g", s[0], "--all", "--reason", "x"
        )
        assert code == 2 and "one of them" in err, err
        code, out, err = await asyncio.to_thread(
            cli,
            bus.address,
            "dead-letters",
            "purge",
            topic,
            "g",
            "--from",
            s[0],
            "--to",
            s[1],
            "--reason",
            "bad batch",
        )
        assert (code, out) == (0, f"{topic}\tg\tpurged 2\n"), err
        code, out, err = await asyncio.to_thread(
            cli, bus.address, "dead-letters", "replay", topic, "g", "--from", s[3]
        )
        assert (code, out) == (0, f"{topic}\tg\treplayed 1\n"), err
        (again,) = await sub.receive(1)
        assert again.message.payload == b"m3"
        code, out, err = await asyncio.to_thread(
            cli, bus.address, "dead-letters", "purge", topic, "g", "--all", "--reason", "drained", "--json"
        )
        assert code == 0 and json.loads(out) == {"purged": 1}, err
        assert await dead_letters(bus, topic) == []
    finally:
        await sub.close()


async def test_replay_reaches_only_the_replayed_group_and_is_idempotent(bus: BusHandle) -> None:
    topic = bus.topic("two")
    await bus.stub.Publish(
        bus_pb2.PublishRequest(topic=topic, messages=[bus_pb2.BusMessage(id="poison", payload=b"p")])
    )
    acker = RawSubscriber(bus.stub, options(topic, "acker"))
    lazy = RawSubscriber(bus.stub, options(topic, "lazy"))
    try:
        await acker.opened()
        await lazy.opened()
        acker.ack(await acker.receive(1))
        lazy.term(await lazy.receive(1), "later")
        letters: list[bus_pb2.DeadLetter] = []
        for _ in range(200):
            listed = await bus.stub.ListDeadLetters(bus_pb2.ListDeadLettersRequest(topic=topic, group="lazy"))
            letters = list(listed.dead_letters)
            if letters:
                break
            await asyncio.sleep(0.05)
        (letter,) = letters
        replay = bus_pb2.ReplayDeadLettersRequest(
            topic=topic, group="lazy", dead_letter_sequences=[letter.dead_letter_sequence]
        )
        # Two concurrent replays of the same dead letter (one may find it gone already).
        outcomes = await asyncio.gather(
            bus.stub.ReplayDeadLetters(replay), bus.stub.ReplayDeadLetters(replay), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, grpc.aio.AioRpcError):
                assert outcome.code() == grpc.StatusCode.NOT_FOUND, outcome.details()
        assert any(isinstance(outcome, bus_pb2.ReplayDeadLettersResponse) for outcome in outcomes)
        (again,) = await lazy.receive(1)
        assert again.message.payload == b"p" and again.attempt == 1
        assert again.message.headers["rpcmesh-replay-of"] == "poison"
        lazy.ack([again])
        assert await lazy.nothing(0.7) == []  # delivered once
        assert await acker.nothing(0.3) == []  # the other group never sees it
    finally:
        await acker.close()
        await lazy.close()


async def test_a_publisher_cannot_address_one_group_with_the_replay_header(bus: BusHandle) -> None:
    """A published message may not carry the replay header, the Bus's own mark on replays.

    It would hide the message from every other group; Publish refuses it and stores nothing.
    """
    topic = bus.topic("marked")
    marked = bus_pb2.BusMessage(payload=b"x", headers={"rpcmesh-replay-group": "g"})
    error = await refused(bus.stub.Publish(bus_pb2.PublishRequest(topic=topic, messages=[marked])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0].headers[rpcmesh-replay-group]" in (error.details() or "")
    topics = await bus.stub.ListTopics(bus_pb2.ListTopicsRequest(page_size=1000))
    assert topic not in {t.name for t in topics.topics}
