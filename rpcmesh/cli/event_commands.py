"""`rpcmesh events append|read`: the EventStore from the command line."""

from __future__ import annotations

import argparse
from typing import Any

from rpcmesh.cli.common import CliError, add_target_arguments, parse_headers, payload_bytes, target_of
from rpcmesh.cli.output import print_json, print_table
from rpcmesh.v1 import eventstore_pb2, eventstore_pb2_grpc

EXPECT = {
    "any": eventstore_pb2.EXPECTED_STATE_ANY,
    "no-stream": eventstore_pb2.EXPECTED_STATE_NO_STREAM,
    "exists": eventstore_pb2.EXPECTED_STATE_STREAM_EXISTS,
}


def register(commands: Any) -> None:
    """Add `rpcmesh events` and its subcommands to the CLI."""
    events = commands.add_parser(
        "events", help="append and read event streams", description="Work with events."
    )
    sub = events.add_subparsers(dest="events_command", required=True, metavar="SUBCOMMAND")

    append = sub.add_parser("append", help="append an event", description="Append one event to a stream.")
    append.add_argument("stream")
    append.add_argument("event_type")
    append.add_argument("--data", help="event data (JSON by default)")
    append.add_argument("--data-file", help="read the data from a file ('-' for stdin)")
    append.add_argument("--content-type", default="application/json")
    append.add_argument("--id", default="", help="event id (deduplicated within the stream)")
    append.add_argument("--metadata", "-m", action="append", help="KEY=VALUE metadata (repeatable)")
    append.add_argument("--json", action="store_true", help="print the AppendToStreamResponse as JSON")
    expected = append.add_mutually_exclusive_group()
    expected.add_argument("--expect", choices=sorted(EXPECT), default="any", help="expected stream state")
    expected.add_argument("--expected-revision", type=int, help="the stream must be at exactly this revision")
    add_target_arguments(append)
    append.set_defaults(func=run_append)

    read = sub.add_parser(
        "read",
        help="read a stream or the global log",
        description="Read a stream (or every stream with --all).",
    )
    read.add_argument("stream", nargs="?", help="stream name")
    read.add_argument("--all", action="store_true", help="read the global log")
    read.add_argument("--from", dest="start", type=int, default=None, help="first revision / position")
    read.add_argument("--backwards", action="store_true")
    read.add_argument("--limit", type=int, default=100)
    read.add_argument("--type", dest="types", action="append", help="with --all: keep this event type")
    read.add_argument(
        "--prefix", dest="prefixes", action="append", help="with --all: keep this stream prefix"
    )
    read.add_argument(
        "--json", action="store_true", help="print the ReadStreamResponse (with --all: ReadAllResponse)"
    )
    add_target_arguments(read)
    read.set_defaults(func=run_read)


def run_append(args: argparse.Namespace) -> int:
    """Run `rpcmesh events append STREAM TYPE`."""
    target = target_of(args)
    request = eventstore_pb2.AppendToStreamRequest(
        stream=args.stream,
        events=[
            eventstore_pb2.EventData(
                event_id=args.id,
                event_type=args.event_type,
                data=payload_bytes(
                    args.data,
                    args.data_file,
                    json_expected=args.content_type == "application/json",
                    what="data",
                ),
                content_type=args.content_type,
                metadata=parse_headers(args.metadata, "--metadata"),
            )
        ],
    )
    if args.expected_revision is not None:
        request.expected_revision = args.expected_revision
    else:
        request.expected_state = EXPECT[args.expect]
    with target.channel() as channel:
        response = eventstore_pb2_grpc.EventStoreStub(channel).AppendToStream(request, timeout=target.timeout)
    if args.json:
        print_json(response)
    else:
        print(f"{args.stream}\trevision {response.current_revision}\tposition {response.position}")
    return 0


def run_read(args: argparse.Namespace) -> int:
    """Run `rpcmesh events read STREAM | --all`."""
    target = target_of(args)
    if bool(args.stream) == bool(args.all):
        raise CliError("give a stream name or --all (one of them)")
    with target.channel() as channel:
        stub = eventstore_pb2_grpc.EventStoreStub(channel)
        if args.all:
            all_response = stub.ReadAll(
                eventstore_pb2.ReadAllRequest(
                    from_position=args.start or 0,
                    filter=eventstore_pb2.ReadAllFilter(
                        event_types=args.types or [], stream_prefixes=args.prefixes or []
                    ),
                    page_size=args.limit,
                ),
                timeout=target.timeout,
            )
            response: eventstore_pb2.ReadAllResponse | eventstore_pb2.ReadStreamResponse = all_response
        else:
            direction = (
                eventstore_pb2.READ_DIRECTION_BACKWARDS
                if args.backwards
                else eventstore_pb2.READ_DIRECTION_FORWARDS
            )
            start = args.start if args.start is not None else (-1 if args.backwards else 0)
            stream_response = stub.ReadStream(
                eventstore_pb2.ReadStreamRequest(
                    stream=args.stream, from_revision=start, direction=direction, page_size=args.limit
                ),
                timeout=target.timeout,
            )
            response = stream_response
    events = list(response.events)
    if args.json:
        print_json(response)
    else:
        print_table(
            ["position", "stream", "revision", "type", "data"],
            [
                [e.position, e.stream, e.stream_revision, e.event_type, e.data.decode(errors="replace")[:80]]
                for e in events
            ],
        )
    return 0
