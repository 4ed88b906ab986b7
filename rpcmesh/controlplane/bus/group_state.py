"""Delivery bookkeeping of one consumer group on one topic (pure, I/O-free).

:class:`GroupState` decides which message goes out next, tracks what is in
flight, schedules redeliveries, keeps the per-key order and advances the ack
floor. The broker feeds it messages read from the log and the clock (``now``),
and persists what it reports; nothing here touches storage or the network.

Rules:

* Messages are delivered in sequence order; redeliveries (lower sequences) go
  first.
* Per-key order: while a message with key K is unacknowledged (in flight or
  waiting for redelivery), later messages with key K are held back.
* A delivery not acknowledged by its deadline, or nakked, waits for
  :func:`redelivery_delay` (or the nak's delay) and is offered again; after
  ``max_deliveries`` attempts (or on term) it is handed back as dead.
* A dead letter replayed into another group (see
  :data:`~rpcmesh.controlplane.bus.topics.REPLAY_GROUP_HEADER`) is done at once.
* Acknowledged messages count as done; a dead message counts as done only once
  its dead letter is stored (:meth:`GroupState.buried`): until then it holds the
  ack floor below it, so a failed or lost dead-letter write never loses it. The
  ack floor is the sequence below which everything is done.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from rpcmesh.controlplane.bus.redelivery import exhausted, redelivery_delay
from rpcmesh.controlplane.bus.topics import skipped_by
from rpcmesh.v1 import bus_pb2

DEADLINE_PASSED = "ack deadline passed"
"""The last error of a delivery that was not acknowledged in time."""


@dataclass(frozen=True, kw_only=True)
class DeliveryPolicy:
    """How a subscription wants its deliveries treated."""

    ack_deadline: float = 30.0
    """Seconds a delivery may stay unacknowledged before it is redelivered."""

    max_deliveries: int = 5
    """Attempts before the message is dead-lettered (0 = unlimited)."""

    redelivery_backoff: float = 1.0
    """First redelivery delay in seconds; doubles per attempt."""

    def __post_init__(self) -> None:
        if self.ack_deadline <= 0:
            raise ValueError(f"ack_deadline: must be > 0, got {self.ack_deadline}")
        if self.max_deliveries < 0:
            raise ValueError(f"max_deliveries: must be >= 0, got {self.max_deliveries}")
        if self.redelivery_backoff < 0:
            raise ValueError(f"redelivery_backoff: must be >= 0, got {self.redelivery_backoff}")


@dataclass(eq=False)
class Entry:
    """One message the group has read and not yet finished."""

    message: bus_pb2.BusMessage
    attempts: int = 0
    """Deliveries so far."""
    member: Hashable | None = None
    """Who holds it while in flight."""
    deadline: float = 0.0
    policy: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    last_error: str = ""
    """Why the last delivery failed (the nak's error, or :data:`DEADLINE_PASSED`); kept in memory only."""

    @property
    def sequence(self) -> int:
        """The message's sequence in its topic."""
        return int(self.message.sequence)


@dataclass(frozen=True)
class Dead:
    """A message the group gives up on."""

    message: bus_pb2.BusMessage
    attempts: int
    reason: str
    last_error: str = ""
    """The error of the last failed delivery (empty when none is known)."""


class GroupState:
    """In-memory delivery state of one group on one topic."""

    def __init__(
        self,
        *,
        ack_floor: int,
        acked_above_floor: Iterable[int] = (),
        attempts: dict[int, int] | None = None,
        group: str = "",
    ) -> None:
        self.group = group
        """The group's name: dead letters replayed into another group are skipped (done at once)."""
        self.ack_floor = ack_floor
        self.next_sequence = ack_floor + 1
        """Next sequence to read from the log."""
        self._done: set[int] = {seq for seq in acked_above_floor if seq > ack_floor}
        self._attempts = dict(attempts or {})
        self._ready: list[tuple[int, Entry]] = []
        self._waiting: list[tuple[float, int, Entry]] = []
        self.in_flight: dict[int, Entry] = {}
        self.held: Counter[Hashable] = Counter()
        """In-flight deliveries per member."""
        self._key_owner: dict[str, int] = {}
        self._blocked: dict[str, list[Entry]] = {}
        self._known: dict[int, Entry] = {}
        self._burying: dict[int, int] = {}
        """Dead sequences whose dead letter is not stored yet, and their attempts."""

    # -- feeding -----------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Messages read from the log and not yet finished or in flight."""
        return len(self._known) - len(self.in_flight)

    def add_read(self, messages: Iterable[bus_pb2.BusMessage], read_through: int) -> None:
        """Take messages read from the log; every sequence up to ``read_through`` was scanned.

        Sequences in the scanned range that are missing (removed by retention or
        replay) count as done, so the ack floor can pass them.
        """
        present: set[int] = set()
        for message in messages:
            seq = int(message.sequence)
            present.add(seq)
            if seq < self.next_sequence or seq in self._done or seq in self._known:
                continue
            if skipped_by(message.headers, self.group):
                self._done.add(seq)
                continue
            entry = Entry(message=message, attempts=self._attempts.pop(seq, 0))
            self._known[seq] = entry
            heapq.heappush(self._ready, (seq, entry))
        for seq in range(self.next_sequence, read_through + 1):
            if seq not in present:
                self._done.add(seq)
        self.next_sequence = max(self.next_sequence, read_through + 1)
        self._advance_floor()

    def skip_to(self, sequence: int) -> None:
        """Treat everything below ``sequence`` that was never read as done (retention removed it)."""
        if sequence > self.next_sequence:
            for seq in range(self.next_sequence, sequence):
                self._done.add(seq)
            self.next_sequence = sequence
            self._advance_floor()

    # -- delivering --------------------------------------------------------------

    def take(self, member: Hashable, limit: int, now: float, policy: DeliveryPolicy) -> list[Entry]:
        """Hand up to ``limit`` deliverable messages to ``member``; their attempts are incremented."""
        self._release_due(now)
        taken: list[Entry] = []
        while self._ready and len(taken) < limit:
            seq, entry = heapq.heappop(self._ready)
            if self._known.get(seq) is not entry:
                continue
            key = entry.message.key
            if key:
                owner = self._key_owner.get(key)
                if owner is not None and owner != seq:
                    self._blocked.setdefault(key, []).append(entry)
                    continue
                self._key_owner[key] = seq
            entry.attempts += 1
            entry.member = member
            entry.policy = policy
            entry.deadline = now + policy.ack_deadline
            self.in_flight[seq] = entry
            self.held[member] += 1
            taken.append(entry)
        return taken

    def has_ready(self, now: float) -> bool:
        """True when some message could be handed out now."""
        self._release_due(now)
        return bool(self._ready)

    def next_timer(self) -> float | None:
        """The earliest time something changes by itself (a deadline or a redelivery)."""
        times = [entry.deadline for entry in self.in_flight.values()]
        if self._waiting:
            times.append(self._waiting[0][0])
        return min(times) if times else None

    # -- outcomes ------------------------------------------------------------------

    def ack(self, seq: int) -> bool:
        """Acknowledge an in-flight (or waiting) message; False when it is unknown or done."""
        entry = self._known.get(seq)
        if entry is None:
            return False
        self._finish(entry)
        return True

    def nak(self, seq: int, now: float, delay: float | None = None, error: str = "") -> Dead | None:
        """Return an in-flight message for redelivery after ``delay`` (None = backoff).

        ``error`` (why the delivery failed) is kept as the message's last error.
        Returns the message as dead when it has used up its deliveries.
        """
        entry = self.in_flight.get(seq)
        if entry is None:
            return None
        entry.last_error = error
        if exhausted(entry.attempts, entry.policy.max_deliveries):
            return self._kill(entry, "max_deliveries")
        self._wait(entry, now, delay)
        return None

    def term(self, seq: int, reason: str) -> Dead | None:
        """Give up on an in-flight message at once."""
        entry = self.in_flight.get(seq)
        if entry is None:
            return None
        return self._kill(entry, reason or "terminated")

    def expire(self, now: float) -> list[Dead]:
        """Reschedule deliveries past their deadline; returns those that used up their attempts."""
        dead: list[Dead] = []
        for entry in [e for e in self.in_flight.values() if e.deadline <= now]:
            entry.last_error = DEADLINE_PASSED
            if exhausted(entry.attempts, entry.policy.max_deliveries):
                dead.append(self._kill(entry, "max_deliveries"))
            else:
                self._wait(entry, now, None)
        return dead

    def member_gone(self, member: Hashable) -> list[Dead]:
        """A subscriber left: its in-flight messages are offered again at once."""
        dead: list[Dead] = []
        for entry in [e for e in self.in_flight.values() if e.member == member]:
            self._leave_flight(entry)
            entry.last_error = ""
            if exhausted(entry.attempts, entry.policy.max_deliveries):
                dead.append(self._kill(entry, "max_deliveries"))
            else:
                heapq.heappush(self._ready, (entry.sequence, entry))
        return dead

    def held_by(self, member: Hashable) -> int:
        """How many in-flight deliveries ``member`` holds."""
        return self.held[member]

    @property
    def pending(self) -> int:
        """Messages read and not finished (in flight, ready, waiting or held back by key)."""
        return len(self._known)

    def attempts_to_keep(self) -> dict[int, int]:
        """Deliveries so far of every unfinished message delivered at least once (to persist)."""
        kept = {
            seq: count
            for seq, count in self._attempts.items()
            if seq > self.ack_floor and seq not in self._done
        }
        kept.update((seq, entry.attempts) for seq, entry in self._known.items() if entry.attempts > 0)
        kept.update(self._burying)
        return kept

    @property
    def burying(self) -> int:
        """Dead messages whose dead letter is not stored yet (they hold the ack floor)."""
        return len(self._burying)

    def buried(self, sequences: Iterable[int]) -> None:
        """The dead letters of these dead sequences are stored: they count as done."""
        for seq in sequences:
            if self._burying.pop(seq, None) is not None:
                self._done.add(seq)
        self._advance_floor()

    @property
    def acked_above_floor(self) -> set[int]:
        """Done sequences above the ack floor (to persist)."""
        return set(self._done)

    # -- internals -----------------------------------------------------------------

    def _leave_flight(self, entry: Entry) -> None:
        if self.in_flight.pop(entry.sequence, None) is not None and entry.member is not None:
            self.held[entry.member] -= 1
            if self.held[entry.member] <= 0:
                del self.held[entry.member]
        entry.member = None

    def _wait(self, entry: Entry, now: float, delay: float | None) -> None:
        self._leave_flight(entry)
        if delay is None:
            delay = redelivery_delay(entry.attempts, entry.policy.redelivery_backoff)
        heapq.heappush(self._waiting, (now + delay, entry.sequence, entry))

    def _release_due(self, now: float) -> None:
        while self._waiting and self._waiting[0][0] <= now:
            _, seq, entry = heapq.heappop(self._waiting)
            if self._known.get(seq) is entry and seq not in self.in_flight:
                heapq.heappush(self._ready, (seq, entry))

    def _kill(self, entry: Entry, reason: str) -> Dead:
        attempts = entry.attempts
        self._burying[entry.sequence] = attempts
        self._finish(entry, done=False)
        return Dead(message=entry.message, attempts=attempts, reason=reason, last_error=entry.last_error)

    def _finish(self, entry: Entry, *, done: bool = True) -> None:
        seq = entry.sequence
        self._leave_flight(entry)
        self._known.pop(seq, None)
        if done:
            self._done.add(seq)
        key = entry.message.key
        if key and self._key_owner.get(key) == seq:
            del self._key_owner[key]
            for blocked in self._blocked.pop(key, []):
                if self._known.get(blocked.sequence) is blocked:
                    heapq.heappush(self._ready, (blocked.sequence, blocked))
        self._advance_floor()

    def _advance_floor(self) -> None:
        floor = self.ack_floor
        while floor + 1 in self._done:
            floor += 1
            self._done.discard(floor)
        self.ack_floor = floor
