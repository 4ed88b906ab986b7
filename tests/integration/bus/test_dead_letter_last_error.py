"""A dead letter shows why its message's last delivery failed (``DeadLetter.last_error``), on both backends.

The last nak's error is kept with the message; a delivery whose ack deadline
passed leaves "ack deadline passed"; a term keeps its reason in ``reason`` and
the last nak's error in ``last_error``. A nak error over the limit is
INVALID_ARGUMENT naming ``nak.error`` and changes nothing. The Python
subscriber naks with the handler's exception.
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

from rpcmesh.bus import Received, Subscriber, SubscriberConfig
from rpcmesh.bus.subscriber import MAX_ERROR_BYTES, nak_error
from rpcmesh.cli.main import main
from rpcmesh.controlplane.bus.component import BusComponent
from tests.integration.bus.conftest import BusHandle
from tests.integration.bus.streams import RawSubscriber, options


async def letters_of(bus: BusHandle, topic: str, count: int) -> list[bus_pb2.DeadLetter]:
    """The group ``g``'s dead letters on ``topic`` once there are ``count``."""
    request = bus_pb2.ListDeadLettersRequest(topic=topic, group="g")
    letters: list[bus_pb2.DeadLetter] = []
    for _ in range(200):
        letters = list((await bus.stub.ListDeadLetters(request)).dead_letters)
        if len(letters) >= count:
            return letters
        await asyncio.sleep(0.025)
    raise AssertionError(f"dead letters on {topic}: {letters}")


async def test_last_error_of_naks_terms_and_deadlines(bus: BusHandle) -> None:
    naks, late = bus.topic("naks"), bus.topic("late")
    for topic, payloads in ((naks, [b"twice", b"then-term"]), (late, [b"slow"])):
        messages = [bus_pb2.BusMessage(payload=p) for p in payloads]
        await bus.stub.Publish(bus_pb2.PublishRequest(topic=topic, messages=messages))
    sub = RawSubscriber(bus.stub, options(naks, max_deliveries=2, backoff_ms=10))
    slow = RawSubscriber(bus.stub, options(late, ack_deadline_ms=300, max_deliveries=2, backoff_ms=10))
    try:
        await sub.opened()
        await slow.opened()
        twice, then_term = await sub.receive(2)
        sub.nak([twice], error="e1")
        sub.nak([then_term], error="b1")
        for delivery in await sub.receive(2):
            if delivery.message.payload == b"twice":
                sub.nak([delivery], error="e2")  # its last attempt: dead
            else:
                sub.term([delivery], "bad payload")
        (first,) = await slow.receive(1)
        slow.nak([first], error="e1")
        (again,) = await slow.receive(1)  # not acknowledged: the deadline passes
        assert again.attempt == 2

        by_payload = {d.message.payload: d for d in await letters_of(bus, naks, 2)}
        dead = by_payload[b"twice"]
        assert (dead.reason, dead.attempts, dead.last_error) == ("max_deliveries", 2, "e2")
        termed = by_payload[b"then-term"]
        assert (termed.reason, termed.last_error) == ("bad payload", "b1")
        (timed_out,) = await letters_of(bus, late, 1)
        assert (timed_out.reason, timed_out.attempts) == ("max_deliveries", 2)
        assert timed_out.last_error == "ack deadline passed"

        # The header of the stored dead letter carries it too.
        component = bus.plane.components[0]
        assert isinstance(component, BusComponent)
        stored, _ = await component.broker.store.read(f"$dlq.{naks}.g", 1, 10)
        assert {m.headers.get("rpcmesh-dead-last-error") for m in stored} == {"e2", "b1"}
    finally:
        await sub.close()
        await slow.close()


async def test_over_long_nak_error_is_refused_naming_the_field(bus: BusHandle) -> None:
    topic = bus.topic("long")
    await bus.stub.Publish(bus_pb2.PublishRequest(topic=topic, messages=[bus_pb2.BusMessage(payload=b"m")]))
    sub = RawSubscriber(bus.stub, options(topic, max_deliveries=2, backoff_ms=10))
    try:
        await sub.opened()
        (delivery,) = await sub.receive(1)
        sub.nak([delivery], error="é" * 512 + "x")  # 1025 bytes (513 characters)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await sub.receive(1)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "nak.error" in (caught.value.details() or "")
    finally:
        await sub.close()
    # Nothing changed: the message comes back (the refused stream's hold ended) and is no dead letter.
    again = RawSubscriber(bus.stub, options(topic, max_deliveries=2, backoff_ms=10))
    try:
        await again.opened()
        (delivery,) = await again.receive(1)
        assert delivery.message.payload == b"m" and delivery.attempt == 2
        assert await letters_of(bus, topic, 0) == []
        again.nak([delivery], error="é" * 512)  # exactly 1024 bytes: taken (its last attempt: dead)
        (letter,) = await letters_of(bus, topic, 1)
        assert letter.last_error == "é" * 512 and letter.message.payload == b"m"
    finally:
        await again.close()


def test_nak_error_is_cut_to_the_limit_on_a_character_boundary() -> None:
    assert nak_error(ValueError("boom")) == "ValueError: boom"
    cut = nak_error(RuntimeError("é" * 600))
    assert len(cut.encode()) <= MAX_ERROR_BYTES and cut.startswith("RuntimeError: éé")
    assert len(cut.encode()) >= MAX_ERROR_BYTES - 1


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


async def test_subscriber_naks_with_the_handler_exception_shown_by_the_cli(sqlite_bus: BusHandle) -> None:
    bus = sqlite_bus
    topic = bus.topic("raises")

    async def handle(item: Received) -> None:
        raise ValueError("boom")

    config = SubscriberConfig(
        topic=topic, group="g", start="earliest", max_deliveries=2, redelivery_backoff=0.01
    )
    subscriber = Subscriber(bus.channel, config, handle)
    await subscriber.start()
    try:
        await bus.stub.Publish(
            bus_pb2.PublishRequest(topic=topic, messages=[bus_pb2.BusMessage(payload=b"x")])
        )
        (letter,) = await letters_of(bus, topic, 1)
    finally:
        await subscriber.stop()
    assert "ValueError: boom" in letter.last_error
    assert (letter.reason, letter.attempts) == ("max_deliveries", 2)
    code, out, err = await asyncio.to_thread(cli, bus.address, "dead-letters", "list", topic, "g")
    assert code == 0 and "\tValueError: boom\t" in out, (out, err)
    code, out, err = await asyncio.to_thread(cli, bus.address, "dead-letters", "list", topic, "g", "--json")
    assert code == 0 and json.loads(out)["dead_letters"][0]["last_error"] == "ValueError: boom", err
