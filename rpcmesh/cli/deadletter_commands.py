"""`rpcmesh dead-letters list|show|replay|purge`: a consumer group's dead letters."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from rpcmesh.cli.common import CliError, CommandFailed, add_target_arguments, pages, target_of
from rpcmesh.cli.output import is_json_content, print_json, print_table
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc

LAST_ERROR_WIDTH = 60
"""Characters of a dead letter's last error shown in the list table."""


def register(commands: Any) -> None:
    """Add `rpcmesh dead-letters` and its subcommands to the CLI."""
    dead = commands.add_parser(
        "dead-letters",
        help="list, show, replay and purge dead letters",
        description="Messages a consumer group gave up on (too many deliveries, or terminated).",
    )
    sub = dead.add_subparsers(dest="dead_letters_command", required=True, metavar="SUBCOMMAND")

    listing = sub.add_parser(
        "list", help="list a group's dead letters", description="List the dead letters of TOPIC and GROUP."
    )
    listing.add_argument("topic")
    listing.add_argument("group")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default %(default)s)")
    listing.add_argument("--json", action="store_true", help="print the ListDeadLettersResponse as JSON")
    add_target_arguments(listing)
    listing.set_defaults(func=run_list)

    show = sub.add_parser(
        "show",
        help="show one dead letter",
        description="Show one dead letter, by its sequence in the dead-letter topic, with its payload.",
    )
    show.add_argument("topic")
    show.add_argument("group")
    show.add_argument("sequence", type=int, help="dead_letter_sequence, as `list` prints it")
    show.add_argument("--json", action="store_true", help="print the DeadLetter as JSON")
    add_target_arguments(show)
    show.set_defaults(func=run_show)

    replay = sub.add_parser(
        "replay",
        help="republish dead letters",
        description="Republish dead letters to their original topic: the given sequences, a range "
        "(--from/--to), or --all.",
    )
    replay.add_argument("topic")
    replay.add_argument("group")
    replay.add_argument("sequences", nargs="*", type=int, help="dead_letter_sequence values to replay")
    _add_selection(replay, "replay")
    replay.add_argument("--json", action="store_true", help="print the ReplayDeadLettersResponse as JSON")
    add_target_arguments(replay)
    replay.set_defaults(func=run_replay)

    purge = sub.add_parser(
        "purge",
        help="delete dead letters for good",
        description="Delete dead letters of TOPIC and GROUP for good: the given sequences, a range "
        "(--from/--to), or --all. --reason is required; the Bus logs it with what was deleted.",
    )
    purge.add_argument("topic")
    purge.add_argument("group")
    purge.add_argument("sequences", nargs="*", type=int, help="dead_letter_sequence values to purge")
    _add_selection(purge, "purge")
    purge.add_argument("--reason", required=True, help="why the dead letters are deleted (logged)")
    purge.add_argument("--json", action="store_true", help="print the PurgeDeadLettersResponse as JSON")
    add_target_arguments(purge)
    purge.set_defaults(func=run_purge)


def _add_selection(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--all", action="store_true", help=f"{verb} every dead letter of the group")
    parser.add_argument(
        "--from", dest="first", type=int, default=0, help=f"{verb} dead letters from this sequence on"
    )
    parser.add_argument(
        "--to", dest="last", type=int, default=0, help="... through this sequence (default: the newest)"
    )


def _selection(args: argparse.Namespace) -> bus_pb2.DeadLetterRange | None:
    """The range the flags give, or None; exactly one of sequences, a range and --all is required."""
    has_range = bool(args.first or args.last)
    if sum((bool(args.sequences), has_range, bool(args.all))) != 1:
        raise CliError("give dead-letter sequences, --from/--to or --all (one of them)")
    if not has_range:
        return None
    if args.first < 1:
        raise CliError("--from: 1 or more")
    if args.last and args.last < args.first:
        raise CliError("--to: at least --from")
    return bus_pb2.DeadLetterRange(first=args.first, last=args.last)


def _pages(
    stub: bus_pb2_grpc.BusStub, topic: str, group: str, timeout: float, page_size: int = 500
) -> Iterator[bus_pb2.DeadLetter]:
    """Every dead letter of topic/group, page by page."""
    for page in pages(
        lambda token: stub.ListDeadLetters(
            bus_pb2.ListDeadLettersRequest(topic=topic, group=group, page_size=page_size, page_token=token),
            timeout=timeout,
        )
    ):
        yield from page.dead_letters


def run_list(args: argparse.Namespace) -> int:
    """Run `rpcmesh dead-letters list TOPIC GROUP`."""
    if args.limit <= 0:
        raise CliError("--limit: 1 or more")
    target = target_of(args)
    merged = bus_pb2.ListDeadLettersResponse()
    with target.channel() as channel:
        stub = bus_pb2_grpc.BusStub(channel)
        for letter in _pages(stub, args.topic, args.group, target.timeout, min(args.limit, 500)):
            merged.dead_letters.append(letter)
            if len(merged.dead_letters) >= args.limit:
                break
    if args.json:
        print_json(merged)
    else:
        print_table(
            ["sequence", "message", "attempts", "reason", "last_error", "dead_at"],
            [
                [
                    d.dead_letter_sequence,
                    f"{d.message.topic}#{d.message.sequence}",
                    d.attempts,
                    d.reason,
                    _one_line(d.last_error) or "-",
                    d.dead_at.ToJsonString(),
                ]
                for d in merged.dead_letters
            ],
        )
    return 0


def _one_line(text: str, width: int = LAST_ERROR_WIDTH) -> str:
    """``text`` on one line, cut to ``width`` characters (``show`` prints it whole)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def run_show(args: argparse.Namespace) -> int:
    """Run `rpcmesh dead-letters show TOPIC GROUP SEQUENCE`."""
    target = target_of(args)
    with target.channel() as channel:
        stub = bus_pb2_grpc.BusStub(channel)
        found = next(
            (
                d
                for d in _pages(stub, args.topic, args.group, target.timeout)
                if d.dead_letter_sequence == args.sequence
            ),
            None,
        )
    if found is None:
        raise CommandFailed(f"no dead letter {args.sequence} for topic {args.topic!r} group {args.group!r}")
    if args.json:
        print_json(found)
        return 0
    message = found.message
    print(f"dead letter {found.dead_letter_sequence}  group {found.group}  attempts {found.attempts}")
    print(f"reason: {found.reason}")
    print(f"last error: {found.last_error or '-'}")
    print(f"dead at: {found.dead_at.ToJsonString()}")
    print(f"message: {message.topic}#{message.sequence}  id {message.id}  key {message.key or '-'}")
    print(f"published: {message.publish_time.ToJsonString()}  content type {message.content_type or '-'}")
    for key, value in sorted(message.headers.items()):
        print(f"header: {key}={value}")
    if is_json_content(message.content_type) or message.content_type.startswith("text/"):
        print(message.payload.decode(errors="replace"))
    else:
        print(f"payload: {len(message.payload)} bytes (use --json for base64)")
    return 0


def run_replay(args: argparse.Namespace) -> int:
    """Run `rpcmesh dead-letters replay TOPIC GROUP (SEQUENCE... | --all)`."""
    selection = _selection(args)
    request = bus_pb2.ReplayDeadLettersRequest(
        topic=args.topic, group=args.group, dead_letter_sequences=args.sequences
    )
    if selection is not None:
        request.range.CopyFrom(selection)
    target = target_of(args)
    with target.channel() as channel:
        response = bus_pb2_grpc.BusStub(channel).ReplayDeadLetters(request, timeout=target.timeout)
    if args.json:
        print_json(response)
    else:
        print(f"{args.topic}\t{args.group}\treplayed {response.replayed}")
    return 0


def run_purge(args: argparse.Namespace) -> int:
    """Run `rpcmesh dead-letters purge TOPIC GROUP (SEQUENCE... | --from N [--to M] | --all) --reason R`."""
    selection = _selection(args)
    if not args.reason.strip():
        raise CliError("--reason: must not be empty")
    request = bus_pb2.PurgeDeadLettersRequest(
        topic=args.topic,
        group=args.group,
        dead_letter_sequences=args.sequences,
        all=args.all,
        reason=args.reason,
    )
    if selection is not None:
        request.range.CopyFrom(selection)
    target = target_of(args)
    with target.channel() as channel:
        response = bus_pb2_grpc.BusStub(channel).PurgeDeadLetters(request, timeout=target.timeout)
    if args.json:
        print_json(response)
    else:
        print(f"{args.topic}\t{args.group}\tpurged {response.purged}")
    return 0
