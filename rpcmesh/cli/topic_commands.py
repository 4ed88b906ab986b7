"""`rpcmesh topics list|create|info|delete`: the Bus's topics and their consumer groups."""

from __future__ import annotations

import argparse
import re
from typing import Any

from google.protobuf import duration_pb2

from rpcmesh.cli.common import CliError, add_target_arguments, pages, target_of
from rpcmesh.cli.output import print_json, print_table
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, what: str) -> duration_pb2.Duration:
    """'90', '90s', '15m', '2h' or '7d' as a Duration; CliError otherwise."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise CliError(f"{what}: expected seconds or a number with s/m/h/d, got {text!r}")
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(float(match.group(1)) * _UNIT_SECONDS[match.group(2)] * 1e9))
    return duration


def register(commands: Any) -> None:
    """Add `rpcmesh topics` and its subcommands to the CLI."""
    topics = commands.add_parser(
        "topics", help="list, create, inspect and delete topics", description="Work with Bus topics."
    )
    sub = topics.add_subparsers(dest="topics_command", required=True, metavar="SUBCOMMAND")

    listing = sub.add_parser("list", help="list topics", description="List topics with their sizes.")
    listing.add_argument("--json", action="store_true", help="print the ListTopicsResponse as JSON")
    add_target_arguments(listing)
    listing.set_defaults(func=run_list)

    create = sub.add_parser(
        "create",
        help="create a topic",
        description="Create a topic with its retention (zero is unbounded). Creating it again with the "
        "same retention succeeds; with another retention it fails with ALREADY_EXISTS.",
    )
    create.add_argument("name")
    create.add_argument("--max-messages", type=int, default=0, help="keep at most this many messages")
    create.add_argument("--max-bytes", type=int, default=0, help="keep at most this many bytes")
    create.add_argument("--max-age", default="", help="drop messages older than this (90s, 15m, 2h, 7d)")
    create.add_argument("--json", action="store_true", help="print the CreateTopicResponse as JSON")
    add_target_arguments(create)
    create.set_defaults(func=run_create)

    info = sub.add_parser(
        "info",
        help="describe a topic and its consumer groups",
        description="A topic's retention, sequences and, per consumer group, the messages pending, "
        "in flight and dead-lettered and the ack floor.",
    )
    info.add_argument("name")
    info.add_argument("--json", action="store_true", help="print the GetTopicResponse as JSON")
    add_target_arguments(info)
    info.set_defaults(func=run_info)

    delete = sub.add_parser(
        "delete", help="delete a topic", description="Delete a topic and every message in it."
    )
    delete.add_argument("name")
    delete.add_argument("--yes", action="store_true", help="really delete (required)")
    delete.add_argument("--json", action="store_true", help="print the DeleteTopicResponse as JSON")
    add_target_arguments(delete)
    delete.set_defaults(func=run_delete)


def _retention_text(retention: bus_pb2.Retention) -> str:
    parts = []
    if retention.max_messages:
        parts.append(f"{retention.max_messages} messages")
    if retention.max_bytes:
        parts.append(f"{retention.max_bytes} bytes")
    if retention.HasField("max_age") and retention.max_age.ToNanoseconds():
        parts.append(f"{retention.max_age.ToJsonString()} age")
    return ", ".join(parts) or "unbounded"


def run_list(args: argparse.Namespace) -> int:
    """Run `rpcmesh topics list`."""
    target = target_of(args)
    merged = bus_pb2.ListTopicsResponse()
    with target.channel() as channel:
        stub = bus_pb2_grpc.BusStub(channel)
        for page in pages(
            lambda token: stub.ListTopics(
                bus_pb2.ListTopicsRequest(page_size=500, page_token=token), timeout=target.timeout
            )
        ):
            merged.topics.extend(page.topics)
    if args.json:
        print_json(merged)
    else:
        print_table(
            ["topic", "messages", "first", "last", "groups", "retention"],
            [
                [
                    t.name,
                    t.message_count,
                    t.first_sequence,
                    t.last_sequence,
                    len(t.groups),
                    _retention_text(t.retention),
                ]
                for t in merged.topics
            ],
        )
    return 0


def run_create(args: argparse.Namespace) -> int:
    """Run `rpcmesh topics create NAME`."""
    target = target_of(args)
    if args.max_messages < 0 or args.max_bytes < 0:
        raise CliError("--max-messages and --max-bytes: 0 or more")
    retention = bus_pb2.Retention(max_messages=args.max_messages, max_bytes=args.max_bytes)
    if args.max_age:
        retention.max_age.CopyFrom(parse_duration(args.max_age, "--max-age"))
    with target.channel() as channel:
        response = bus_pb2_grpc.BusStub(channel).CreateTopic(
            bus_pb2.CreateTopicRequest(name=args.name, retention=retention), timeout=target.timeout
        )
    if args.json:
        print_json(response)
    else:
        print(f"{response.topic.name}\t{_retention_text(response.topic.retention)}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Run `rpcmesh topics info NAME`."""
    target = target_of(args)
    with target.channel() as channel:
        response = bus_pb2_grpc.BusStub(channel).GetTopic(
            bus_pb2.GetTopicRequest(name=args.name), timeout=target.timeout
        )
    if args.json:
        print_json(response)
        return 0
    topic = response.topic
    print(
        f"topic {topic.name}  messages {topic.message_count}  sequences {topic.first_sequence}.."
        f"{topic.last_sequence}  retention {_retention_text(topic.retention)}"
    )
    print_table(
        ["group", "pending", "in_flight", "ack_floor", "dead_letters"],
        [[g.name, g.pending, g.in_flight, g.ack_floor, g.dead_letters] for g in topic.groups],
    )
    return 0


def run_delete(args: argparse.Namespace) -> int:
    """Run `rpcmesh topics delete NAME --yes`."""
    if not args.yes:
        raise CliError(f"deleting topic {args.name!r} drops all its messages: add --yes")
    target = target_of(args)
    with target.channel() as channel:
        response = bus_pb2_grpc.BusStub(channel).DeleteTopic(
            bus_pb2.DeleteTopicRequest(name=args.name), timeout=target.timeout
        )
    if args.json:
        print_json(response)
    else:
        print(f"{args.name}\tdeleted")
    return 0
