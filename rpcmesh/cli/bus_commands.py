"""`rpcmesh publish`, `rpcmesh subscribe` and `rpcmesh request`: the Bus from the command line."""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2

from rpcmesh.cli import deadletter_commands, topic_commands
from rpcmesh.cli.common import (
    CliError,
    CommandFailed,
    Target,
    add_target_arguments,
    parse_headers,
    payload_bytes,
    target_of,
)
from rpcmesh.cli.output import print_json
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc

# Reconnection of `rpcmesh subscribe`: the first retry after this long, doubling up to the maximum.
RECONNECT_FIRST_DELAY = 0.2
RECONNECT_MAX_DELAY = 5.0
DEFAULT_GIVE_UP_AFTER = 60.0


def _add_payload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="payload text")
    parser.add_argument("--data-file", help="read the payload from a file ('-' for stdin)")
    parser.add_argument(
        "--content-type", default="application/json", help="payload media type (default %(default)s)"
    )
    parser.add_argument("--key", default="", help="ordering key")
    parser.add_argument("--header", "-H", action="append", help="KEY=VALUE header (repeatable)")


def register(commands: Any) -> None:
    """Add the bus commands to the CLI."""
    publish = commands.add_parser(
        "publish",
        help="publish a message",
        description="Publish one message to a topic; prints its sequence.",
    )
    publish.add_argument("topic")
    _add_payload_arguments(publish)
    publish.add_argument("--id", default="", help="message id for deduplication")
    publish.add_argument("--json", action="store_true", help="print the PublishResponse as JSON")
    add_target_arguments(publish)
    publish.set_defaults(func=run_publish)

    subscribe = commands.add_parser(
        "subscribe",
        help="receive messages",
        description="Subscribe to a topic (or a pattern with * and >) and print messages, acking each.",
    )
    subscribe.add_argument("topic")
    subscribe.add_argument(
        "--group", default="", help="consumer group (default: broadcast, nothing is acked)"
    )
    subscribe.add_argument(
        "--from", dest="start", default="new", help="'new', 'earliest' or a sequence number (default new)"
    )
    subscribe.add_argument("--count", type=int, default=0, help="stop after this many messages")
    subscribe.add_argument(
        "--json", action="store_true", help="one JSON document per message (a Delivery) and line"
    )
    subscribe.add_argument(
        "--give-up-after",
        type=float,
        default=float(os.environ.get("RPCMESH_GIVE_UP_AFTER", str(DEFAULT_GIVE_UP_AFTER))),
        metavar="SECONDS",
        help="when the control plane goes away, retry (saying so on stderr) for this long, then exit 1 "
        "(env RPCMESH_GIVE_UP_AFTER; default %(default)s)",
    )
    add_target_arguments(subscribe)
    subscribe.set_defaults(func=run_subscribe)

    request = commands.add_parser(
        "request",
        help="send a request and print the reply",
        description="Publish a request and wait for the first reply (--timeout bounds the wait).",
    )
    request.add_argument("topic")
    _add_payload_arguments(request)
    request.add_argument("--json", action="store_true", help="print the RequestResponse as JSON")
    add_target_arguments(request)
    request.set_defaults(func=run_request)

    topic_commands.register(commands)
    deadletter_commands.register(commands)


def _message(args: argparse.Namespace) -> bus_pb2.BusMessage:
    json_expected = args.content_type == "application/json"
    return bus_pb2.BusMessage(
        key=args.key,
        headers=parse_headers(args.header),
        payload=payload_bytes(args.data, args.data_file, json_expected=json_expected, what="payload"),
        content_type=args.content_type,
        id=getattr(args, "id", ""),
    )


def run_publish(args: argparse.Namespace) -> int:
    """Run `rpcmesh publish TOPIC`."""
    target = target_of(args)
    with target.channel() as channel:
        response = bus_pb2_grpc.BusStub(channel).Publish(
            bus_pb2.PublishRequest(topic=args.topic, messages=[_message(args)]), timeout=target.timeout
        )
    (result,) = response.results
    if result.code:
        raise CliError(f"publish refused: {result.error}")
    if args.json:
        print_json(response)
    else:
        print(f"{args.topic}\t{result.sequence}\t{result.id}" + ("\tduplicate" if result.duplicate else ""))
    return 0


def _start_position(text: str) -> bus_pb2.StartPosition:
    if text == "new":
        return bus_pb2.StartPosition(new_only=True)
    if text == "earliest":
        return bus_pb2.StartPosition(earliest=True)
    if text.isdigit():
        return bus_pb2.StartPosition(sequence=int(text))
    raise CliError(f"--from: expected 'new', 'earliest' or a sequence number, got {text!r}")


@dataclass
class _Progress:
    """What a subscription has printed so far, kept across reconnections."""

    received: int = 0
    last_sequence: int = 0
    opened: bool = False
    """The current stream was confirmed by the Bus."""
    lost: bool = False
    """An earlier stream was lost."""
    finishing: bool = False
    """--count is reached and the stream half-closed: its end is expected."""


class _StreamLost(Exception):
    """The stream ended without this side asking: the control plane stopped or went away."""


def _is_pattern(topic: str) -> bool:
    return any(token in ("*", ">") for token in topic.split("."))


def run_subscribe(args: argparse.Namespace) -> int:
    """Run `rpcmesh subscribe TOPIC`: reconnect when the control plane goes away, give up after a while."""
    target = target_of(args)
    if args.give_up_after < 0:
        raise CliError("--give-up-after: 0 or more seconds")
    start = _start_position(args.start)
    progress = _Progress()
    lost_since: float | None = None
    failures = 0
    while True:
        progress.opened = False
        try:
            _subscribe_once(args, target, start, progress)
            return 0
        except _StreamLost as exc:
            details = str(exc)
        if args.count and progress.received >= args.count:
            return 0  # lost while leaving: the acks not applied come again to the group, at least once
        if progress.opened:
            lost_since, failures = None, 0  # it had subscribed again: a new outage starts now
        progress.lost = True
        now = time.monotonic()
        lost_since = now if lost_since is None else lost_since
        left = args.give_up_after - (now - lost_since)
        if left <= 0:
            raise CommandFailed(
                f"gave up: the control plane at {target.address} has been unreachable for "
                f"{now - lost_since:.1f}s (--give-up-after {args.give_up_after:g}; {details})"
            )
        delay = min(RECONNECT_FIRST_DELAY * 2**failures, RECONNECT_MAX_DELAY, left)
        failures += 1
        print(
            f"rpcmesh subscribe: lost the control plane at {target.address} ({details}); "
            f"retrying in {delay:.1f}s, giving up in {left:.0f}s",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(delay)
        if not args.group and progress.last_sequence and not _is_pattern(args.topic):
            # A broadcast subscriber has no durable position: resume after the last message it printed.
            start = bus_pb2.StartPosition(sequence=progress.last_sequence + 1)


def _subscribe_once(
    args: argparse.Namespace, target: Target, start: bus_pb2.StartPosition, progress: _Progress
) -> None:
    """One Subscribe stream until --count is reached; _StreamLost when the control plane goes away."""
    options = bus_pb2.SubscriptionOptions(
        topic=args.topic,
        group=args.group,
        mode=bus_pb2.DELIVERY_MODE_GROUP if args.group else bus_pb2.DELIVERY_MODE_BROADCAST,
        start=start,
    )
    outbox: queue.Queue[bus_pb2.SubscribeRequest | None] = queue.Queue()
    outbox.put(bus_pb2.SubscribeRequest(open=options))

    def requests() -> Iterator[bus_pb2.SubscribeRequest]:
        while (item := outbox.get()) is not None:
            yield item

    try:
        with target.channel() as channel:
            call = bus_pb2_grpc.BusStub(channel).Subscribe(requests())
            try:
                _consume(args, target, call, outbox, progress)
            finally:
                outbox.put(None)
                call.cancel()
    except grpc.RpcError as exc:
        # Out here, past the channel's block: a failed TLS handshake has become CommandFailed there.
        code = exc.code()
        if progress.finishing and code is grpc.StatusCode.CANCELLED:
            return
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            # CANCELLED that this side did not ask for: the server stopped and cut its streams.
            detail = exc.details() if isinstance(exc, grpc.Call) else None
            raise _StreamLost(f"{code.name}: {' '.join(str(detail or exc).split())}") from exc
        raise
    if not progress.finishing:
        raise _StreamLost("the stream ended")


def _consume(
    args: argparse.Namespace,
    target: Target,
    call: Any,
    outbox: queue.Queue[bus_pb2.SubscribeRequest | None],
    progress: _Progress,
) -> None:
    """Print (and ack) deliveries until the stream ends; half-close once --count is reached."""
    deadline: threading.Timer | None = None
    try:
        for response in call:
            if response.opened:
                progress.opened = True
                if progress.lost:
                    print("rpcmesh subscribe: subscribed again", file=sys.stderr, flush=True)
            for delivery in response.deliveries:
                if args.count and progress.received >= args.count:
                    break  # past --count: not acked, the group redelivers it
                message = delivery.message
                if args.json:
                    print_json(delivery)
                else:
                    print(
                        f"{message.topic}\t{message.sequence}\t{message.payload.decode(errors='replace')}",
                        flush=True,
                    )
                if args.group:
                    ref = bus_pb2.MessageRef(topic=message.topic, sequence=message.sequence)
                    outbox.put(bus_pb2.SubscribeRequest(ack=bus_pb2.Ack(refs=[ref])))
                progress.received += 1
                progress.last_sequence = message.sequence
            if args.count and progress.received >= args.count and not progress.finishing:
                # Half-close after the queued acks: the server applies them, leaves the
                # group and ends the stream, which this loop reads to its end.
                progress.finishing = True
                outbox.put(None)
                deadline = threading.Timer(target.timeout, call.cancel)
                deadline.daemon = True
                deadline.start()
    finally:
        if deadline is not None:
            deadline.cancel()


def run_request(args: argparse.Namespace) -> int:
    """Run `rpcmesh request TOPIC`."""
    target = target_of(args)
    timeout = duration_pb2.Duration()
    timeout.FromNanoseconds(int(target.timeout * 1e9))
    with target.channel() as channel:
        try:
            response = bus_pb2_grpc.BusStub(channel).Request(
                bus_pb2.RequestRequest(topic=args.topic, message=_message(args), timeout=timeout),
                timeout=target.timeout + 1,
            )
        except grpc.RpcError as exc:
            # The Bus answers UNAVAILABLE when nobody listens: not an unreachable control plane.
            details = exc.details() if isinstance(exc, grpc.Call) else ""
            if exc.code() is grpc.StatusCode.UNAVAILABLE and (details or "").startswith("no responders"):
                raise CommandFailed(f"no responders on topic {args.topic!r}") from exc
            raise
    if args.json:
        print_json(response)
    else:
        sys.stdout.write(response.reply.payload.decode(errors="replace") + "\n")
    return 0
