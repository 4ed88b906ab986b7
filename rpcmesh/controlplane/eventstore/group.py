"""Group commit planning, shared by both backends: one transaction, many appends, each judged alone.

A group is decided in memory under the store's write lock: the backend reads
the current revision of every stream the group touches and every already
stored event id of the group's events, then :func:`plan_group` judges the
appends in arrival order. An append that fails its expected-version check (or
the idempotence rule) fails alone; an append to a stream that an earlier
member of the same group wrote sees that write (its revision and its ids).
Global positions are handed out consecutively from the log head, so ``$all``
stays gap-free.

Idempotence follows EventStoreDB (see ``eventstore.proto``): a batch whose
event ids are all stored, in order at consecutive revisions (and, under an
exact expected revision or NO_STREAM, right after that revision) succeeds
again with the *original* revision and position of its last event and
``appended = 0``; a batch of which only some ids are stored, or all of them
but elsewhere, is refused with :class:`DuplicateEvents`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rpcmesh.controlplane.eventstore.model import (
    ANY,
    STREAM_EXISTS,
    AppendResult,
    NewEvent,
    WrongExpectedVersion,
    expected_matches,
)


class DuplicateEvents(WrongExpectedVersion):
    """Some event ids of the batch are stored already, but the batch is not a retry of one append.

    A WrongExpectedVersion (FAILED_PRECONDITION on the wire), as EventStoreDB answers
    its "corrupted idempotency" case: nothing of the batch was stored.
    """

    def __init__(self, stream: str, expected: int, current_revision: int, stored_ids: Sequence[str]) -> None:
        super().__init__(stream, expected, current_revision)
        self.stored_ids = list(stored_ids)
        self.args = (
            f"stream {stream!r}: {len(self.stored_ids)} of the batch's event ids are stored already "
            f"(first {self.stored_ids[0]!r}) but the batch is not a retry of one earlier append; "
            "nothing was stored",
        )


@dataclass(frozen=True, slots=True)
class PendingAppend:
    """One append of a group."""

    stream: str
    expected: int
    events: Sequence[NewEvent]


Row = tuple[int, str, int, NewEvent]
"""An event to insert: (position, stream, revision, event)."""


@dataclass(slots=True)
class GroupPlan:
    """What a group commit does: the rows to insert, the new head, one outcome per append."""

    rows: list[Row] = field(default_factory=list)
    head: int = 0
    outcomes: list[AppendResult | Exception] = field(default_factory=list)


def judge_duplicates(
    append: PendingAppend, current: int, stored: Mapping[str, tuple[int, int]]
) -> AppendResult | None:
    """The idempotent outcome of an append whose ids are (partly) stored; None when none is.

    ``stored`` maps the batch's already stored event ids to (revision, position).

    Raises:
        DuplicateEvents: only some ids are stored, or all but not as one earlier append.
    """
    ids = [event.event_id for event in append.events]
    found = [event_id for event_id in ids if event_id in stored]
    if not found:
        return None
    if len(found) == len(ids):
        revisions = [stored[event_id][0] for event_id in ids]
        first = revisions[0]
        in_order = revisions == list(range(first, first + len(ids)))
        where_expected = append.expected in (ANY, STREAM_EXISTS) or first == append.expected + 1
        if in_order and where_expected:
            last_revision, last_position = stored[ids[-1]]
            return AppendResult(current_revision=last_revision, position=last_position, appended=0)
    raise DuplicateEvents(append.stream, append.expected, current, found)


def plan_group(
    group: Sequence[PendingAppend],
    head: int,
    currents: Mapping[str, int],
    stored: Mapping[tuple[str, str], tuple[int, int]],
) -> GroupPlan:
    """Judge a group's appends in order, from the state read under the write lock.

    ``currents`` maps each touched stream to its revision (absent: -1); ``stored``
    maps (stream, event id) of already stored ids of the group to (revision, position).
    """
    revision_of = dict(currents)
    known = dict(stored)
    plan = GroupPlan(head=head)
    for append in group:
        current = revision_of.get(append.stream, -1)
        twice = repeated_id(append.events)
        if twice is not None:
            plan.outcomes.append(
                ValueError(f"events[{twice[1]}].event_id repeats events[{twice[0]}].event_id")
            )
            continue
        try:
            keys = [(append.stream, event.event_id) for event in append.events]
            mine = {key[1]: known[key] for key in keys if key in known}
            repeat = judge_duplicates(append, current, mine)
            if repeat is not None:
                plan.outcomes.append(repeat)
                continue
            if not expected_matches(append.expected, current):
                raise WrongExpectedVersion(append.stream, append.expected, current)
        except WrongExpectedVersion as exc:
            plan.outcomes.append(exc)
            continue
        if not append.events:
            plan.outcomes.append(AppendResult(current_revision=current, position=plan.head, appended=0))
            continue
        for offset, event in enumerate(append.events, start=1):
            position, revision = plan.head + offset, current + offset
            plan.rows.append((position, append.stream, revision, event))
            known[(append.stream, event.event_id)] = (revision, position)
        plan.head += len(append.events)
        revision_of[append.stream] = current + len(append.events)
        plan.outcomes.append(
            AppendResult(
                current_revision=current + len(append.events), position=plan.head, appended=len(append.events)
            )
        )
    return plan


MAX_GROUP_APPENDS = 512
"""Group commit cap: bounds the transaction size and the latency of the last append in it."""
MAX_GROUP_EVENTS = 20_000
"""The same cap in events (a group always takes at least one append)."""


def group_size(sizes: Sequence[int]) -> int:
    """How many queued appends (of ``sizes`` events each, in order) the next group takes."""
    taken, events = 0, 0
    for size in sizes[:MAX_GROUP_APPENDS]:
        if taken and events + size > MAX_GROUP_EVENTS:
            break
        taken, events = taken + 1, events + size
    return taken


class GroupPacer:
    """How long a writer waits for more appends before it commits, and for how many.

    Under concurrent load the writer commits as soon as the queue holds as many appends as
    the largest of its last ``window`` groups (``target``), or after ``wait`` seconds,
    whichever comes first: callers served by one commit come back together, so the groups
    settle at the number of concurrent callers instead of splitting them into one round trip
    (and, on PostgreSQL, one statement and one commit) each. A lone caller's groups have one
    append, so it does not wait; a target that overshoots decays as the window moves on.

    ``wait`` adapts between ``min_wait`` and ``max_wait``: a wait during which appends
    arrived lengthens the next by ``max_wait / 16``, one during which none did halves it.
    Callers that do come back (a closed loop, as in a benchmark or a saga coordinator) keep
    it long, so the groups stay whole even when the machine is loaded and stragglers are
    late; independent callers whose arrivals only sometimes overlap (an open loop) make most
    waits idle, so it shrinks to ``min_wait`` and costs them almost nothing.
    """

    __slots__ = ("_recent", "max_wait", "min_wait", "wait")

    def __init__(self, *, window: int = 8, max_wait: float = 0.005, min_wait: float = 0.0002) -> None:
        self._recent: deque[int] = deque(maxlen=window)
        self.max_wait = max_wait
        self.min_wait = min(min_wait, max_wait)
        self.wait = max_wait / 2
        """How long the next wait may last, in seconds."""

    @property
    def target(self) -> int:
        """The queue length at which the writer stops waiting."""
        return max(self._recent, default=1)

    def waited(self, productive: bool) -> None:
        """The writer waited; appends arrived meanwhile (``productive``) or none did."""
        if productive:
            self.wait = min(self.max_wait, self.wait + self.max_wait / 16)
        else:
            self.wait = max(self.min_wait, self.wait / 2)

    def record(self, taken: int) -> None:
        """A group of ``taken`` appends was committed."""
        self._recent.append(taken)


def repeated_id(events: Sequence[NewEvent]) -> tuple[int, int] | None:
    """(earlier index, later index) of the first event id that appears twice in a batch, or None."""
    first_at: dict[str, int] = {}
    for index, event in enumerate(events):
        if event.event_id in first_at:
            return first_at[event.event_id], index
        first_at[event.event_id] = index
    return None


class QueuedAppend:
    """An append waiting in a node's queue for its group commit: the caller waits on ``future``."""

    __slots__ = ("future", "pending")

    def __init__(self, pending: PendingAppend, future: asyncio.Future[AppendResult]) -> None:
        self.pending = pending
        self.future = future


def settle(group: Sequence[QueuedAppend], outcomes: Sequence[AppendResult | Exception]) -> None:
    """Hand each waiting caller its append's outcome (a caller that gave up is skipped)."""
    for item, outcome in zip(group, outcomes, strict=True):
        if item.future.done():
            continue
        if isinstance(outcome, BaseException):
            item.future.set_exception(outcome)
        else:
            item.future.set_result(outcome)


def fail(group: Sequence[QueuedAppend], error: BaseException) -> None:
    """Fail every caller of ``group`` still waiting: the writer cannot finish it.

    A cancellation (the store closing) is reported as ``event store closed``.
    """
    if not isinstance(error, Exception):
        error = RuntimeError("event store closed")
    for item in group:
        if not item.future.done():
            item.future.set_exception(error)
