"""Operator paths on dead letters: choosing them (sequences, a range, all), replaying and purging them.

Replay republishes the original message to its topic marked with
:data:`~rpcmesh.controlplane.bus.topics.REPLAY_GROUP_HEADER`: only the replayed
group receives it (as attempt 1); every other group counts it as done at once.
Its id is derived from the dead letter (``replay:<group>:<dead-letter
sequence>:<hash of the dead-letter topic>``), so a retried or concurrent replay,
or one retried after a crash between the republish and the dead letter's
delete, is a duplicate within the deduplication window and delivered once. The
original id travels in the ``rpcmesh-replay-of`` header.

A group's dead letters live in the topic ``$dlq.<topic>.<group>``; a dead
letter is named by its sequence there (``dead_letter_sequence``). Purge deletes
them for good and logs the operator's reason with what went.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

from rpcmesh.controlplane.bus.store import BusStore
from rpcmesh.controlplane.bus.topics import REPLAY_GROUP_HEADER
from rpcmesh.errors import NotFoundError, invalid_argument
from rpcmesh.v1 import bus_pb2

logger = logging.getLogger(__name__)

MAX_REASON_LENGTH = 1024
"""Longest purge reason, in characters."""

READ_PAGE = 1000

REPLAY_OF_HEADER = "rpcmesh-replay-of"
"""Header of a replayed message: the id it was published with."""


def replay_copies(
    chosen: Sequence[bus_pb2.BusMessage], group: str, dead_topic: str
) -> list[bus_pb2.BusMessage]:
    """The messages to republish for these stored dead letters, addressed to ``group`` only."""
    topic_hash = hashlib.sha256(dead_topic.encode()).hexdigest()[:16]
    copies = []
    for stored in chosen:
        original = bus_pb2.DeadLetter.FromString(stored.payload).message
        original.ClearField("sequence")
        original.ClearField("publish_time")
        original.ClearField("topic")
        original.headers[REPLAY_GROUP_HEADER] = group
        if original.id:
            original.headers[REPLAY_OF_HEADER] = original.id
        original.id = f"replay:{group}:{stored.sequence}:{topic_hash}"
        copies.append(original)
    return copies


def check_selection(
    sequences: Sequence[int], has_range: bool, selection: bus_pb2.DeadLetterRange, last: int
) -> None:
    """Raise INVALID_ARGUMENT naming the field when the sequences or the range are malformed."""
    if sequences and has_range:
        raise invalid_argument("range", "give dead_letter_sequences or a range, not both")
    for index, seq in enumerate(sequences):
        if seq < 1 or seq > last:
            raise invalid_argument(f"dead_letter_sequences[{index}]", f"{seq} is not a dead-letter sequence")
    if has_range:
        if selection.first < 1:
            raise invalid_argument("range.first", "must be at least 1")
        if selection.last and selection.last < selection.first:
            raise invalid_argument("range.last", f"must be 0 or at least range.first ({selection.first})")


async def choose(
    store: BusStore,
    dead_topic: str,
    sequences: Sequence[int],
    selection: bus_pb2.DeadLetterRange | None,
) -> list[bus_pb2.BusMessage]:
    """The stored dead letters selected: listed sequences (all must exist), a range, or all (neither).

    Raises:
        NotFoundError: a listed sequence is not (or no longer) a dead letter.
    """
    wanted = set(sequences)
    last = store.last_sequence(dead_topic)
    start, end = 1, last
    if selection is not None:
        start = selection.first
        end = min(last, selection.last) if selection.last else last
    chosen: list[bus_pb2.BusMessage] = []
    while start <= end:
        messages, through = await store.read(dead_topic, start, READ_PAGE)
        chosen.extend(m for m in messages if m.sequence <= end and (not wanted or m.sequence in wanted))
        if through >= end or not messages:
            break
        start = through + 1
    if wanted:
        missing = wanted - {m.sequence for m in chosen}
        if missing:
            raise NotFoundError(
                f"dead_letter_sequences: {sorted(missing)} are not (or no longer) dead letters"
            )
    return chosen


async def purge(
    store: BusStore, topic: str, group: str, dead_topic: str, request: bus_pb2.PurgeDeadLettersRequest
) -> int:
    """Delete the selected dead letters for good; returns how many were deleted."""
    reason = request.reason.strip()
    if not reason:
        raise invalid_argument("reason", "must not be empty: say why the dead letters are purged")
    if len(request.reason) > MAX_REASON_LENGTH:
        raise invalid_argument("reason", f"must be at most {MAX_REASON_LENGTH} characters")
    has_range = request.HasField("range")
    chosen_ways = sum((bool(request.dead_letter_sequences), has_range, request.all))
    if chosen_ways != 1:
        raise invalid_argument("all", "give exactly one of dead_letter_sequences, range and all")
    check_selection(request.dead_letter_sequences, has_range, request.range, store.last_sequence(dead_topic))
    chosen = await choose(
        store, dead_topic, request.dead_letter_sequences, request.range if has_range else None
    )
    if not chosen:
        return 0
    deleted = await store.delete_messages(dead_topic, [m.sequence for m in chosen])
    logger.warning(
        "purged %d dead letters of %s/%s (dead-letter sequences %s, message ids %s): %s",
        deleted,
        topic,
        group,
        [m.sequence for m in chosen],
        [bus_pb2.DeadLetter.FromString(m.payload).message.id for m in chosen],
        reason,
    )
    return deleted
