"""Local bookkeeping of a group served from a JetStream durable consumer (pure, I/O-free).

On NATS, JetStream decides what is delivered, counts deliveries and redelivers
what is not acknowledged in time. A Bus node only keeps what it fetched and
has not finished: which member holds which message, until when, and the
per-key order among its own members.

Rules:

* Fetched messages go out in sequence order to members with room.
* Per-key order: while a message with key K is held by a member (or was
  returned and is expected back from JetStream), later messages with key K
  wait locally. A returned owner keeps its key for ``hold_for`` seconds (its
  redelivery time plus an ack deadline); if it does not come back by then
  (another node took it) the key is released. Order per key is therefore kept
  among the members of one Bus node; across nodes serving one group JetStream
  gives no per-key order.
* A message fetched again (JetStream redelivered it) replaces the local copy.
* Messages waiting locally must be kept alive in JetStream (``+WPI``):
  :meth:`ConsumerLedger.touch_due` names them.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from rpcmesh.v1 import bus_pb2


@dataclass(eq=False)
class Fetched:
    """One message fetched from the consumer and not finished."""

    message: bus_pb2.BusMessage
    attempts: int
    """JetStream's delivery count of this delivery, from 1."""
    handle: Any = None
    """What acks this delivery in JetStream (opaque here)."""
    member: Hashable | None = None
    deadline: float = 0.0
    touched: float = 0.0
    """Last time JetStream was told the message is being worked on (or fetched)."""

    @property
    def sequence(self) -> int:
        """The stream sequence."""
        return int(self.message.sequence)


class ConsumerLedger:
    """What one Bus node fetched from one group's consumer (see module docstring)."""

    def __init__(self) -> None:
        self._known: dict[int, Fetched] = {}
        self._ready: list[tuple[int, Fetched]] = []
        self.in_flight: dict[int, Fetched] = {}
        self.held: Counter[Hashable] = Counter()
        self._key_owner: dict[str, int] = {}
        self._key_expiry: dict[str, float] = {}
        """Keys whose owner was returned to JetStream: released at this time."""
        self._blocked: dict[str, list[Fetched]] = {}

    @property
    def buffered(self) -> int:
        """Fetched messages not handed to a member."""
        return len(self._known) - len(self.in_flight)

    def offer(self, entry: Fetched, now: float) -> Fetched | None:
        """Take a fetched message; returns the local copy it replaces (a stale delivery), if any."""
        old = self._known.pop(entry.sequence, None)
        if old is not None:
            self._leave_flight(old)
        entry.touched = now
        self._known[entry.sequence] = entry
        heapq.heappush(self._ready, (entry.sequence, entry))
        return old

    def take(self, member: Hashable, limit: int, now: float, ack_deadline: float) -> list[Fetched]:
        """Hand up to ``limit`` messages to ``member``."""
        self._release_keys(now)
        taken: list[Fetched] = []
        while self._ready and len(taken) < limit:
            seq, entry = heapq.heappop(self._ready)
            if self._known.get(seq) is not entry or entry.member is not None:
                continue
            key = entry.message.key
            if key:
                owner = self._key_owner.get(key)
                if owner is not None and owner != seq:
                    self._blocked.setdefault(key, []).append(entry)
                    continue
                self._key_owner[key] = seq
                self._key_expiry.pop(key, None)
            entry.member = member
            entry.deadline = now + ack_deadline
            self.in_flight[seq] = entry
            self.held[member] += 1
            taken.append(entry)
        return taken

    def has_ready(self) -> bool:
        """True when some message waits for a member."""
        return bool(self._ready)

    def finish(self, seq: int) -> Fetched | None:
        """Acknowledged, terminated or dead: forget it and release its key."""
        entry = self._known.pop(seq, None)
        if entry is None:
            return None
        self._leave_flight(entry)
        key = entry.message.key
        if key and self._key_owner.get(key) == seq:
            del self._key_owner[key]
            self._key_expiry.pop(key, None)
            self._unblock(key)
        return entry

    def release(self, seq: int, now: float, hold_for: float) -> Fetched | None:
        """Returned to JetStream (nak): forget it locally; its key waits ``hold_for`` for it."""
        entry = self._known.pop(seq, None)
        if entry is None:
            return None
        self._leave_flight(entry)
        key = entry.message.key
        if key and self._key_owner.get(key) == seq:
            self._key_expiry[key] = now + hold_for
        return entry

    def expire(self, now: float, hold_for: float) -> list[Fetched]:
        """In-flight deliveries past their deadline: forgotten (JetStream redelivers them)."""
        late = [entry for entry in self.in_flight.values() if entry.deadline <= now]
        for entry in late:
            self.release(entry.sequence, now, hold_for)
        return late

    def member_gone(self, member: Hashable, now: float, hold_for: float) -> list[Fetched]:
        """A member left: its deliveries are forgotten (the caller returns them to JetStream)."""
        gone = [entry for entry in self.in_flight.values() if entry.member == member]
        for entry in gone:
            self.release(entry.sequence, now, hold_for)
        return gone

    def drain(self) -> list[Fetched]:
        """Forget everything (the node stops serving the group); the caller returns them."""
        entries = list(self._known.values())
        self._known.clear()
        self._ready.clear()
        self.in_flight.clear()
        self.held.clear()
        self._key_owner.clear()
        self._key_expiry.clear()
        self._blocked.clear()
        for entry in entries:
            entry.member = None
        return entries

    def held_by(self, member: Hashable) -> int:
        """In-flight deliveries of ``member``."""
        return self.held[member]

    def touch_due(self, now: float, interval: float) -> list[Fetched]:
        """Messages waiting locally (not with a member) not kept alive for ``interval`` seconds."""
        due = []
        for entry in self._known.values():
            if entry.member is None and now - entry.touched >= interval:
                entry.touched = now
                due.append(entry)
        return due

    def next_timer(self) -> float | None:
        """The earliest in-flight deadline or key release."""
        times = [entry.deadline for entry in self.in_flight.values()]
        times.extend(self._key_expiry.values())
        return min(times) if times else None

    # -- internals -----------------------------------------------------------------

    def _leave_flight(self, entry: Fetched) -> None:
        if self.in_flight.pop(entry.sequence, None) is not None and entry.member is not None:
            self.held[entry.member] -= 1
            if self.held[entry.member] <= 0:
                del self.held[entry.member]
        entry.member = None

    def _unblock(self, key: str) -> None:
        for blocked in self._blocked.pop(key, []):
            if self._known.get(blocked.sequence) is blocked:
                heapq.heappush(self._ready, (blocked.sequence, blocked))

    def _release_keys(self, now: float) -> None:
        for key, at in list(self._key_expiry.items()):
            if at <= now:
                del self._key_expiry[key]
                if key in self._key_owner and self._key_owner[key] not in self._known:
                    del self._key_owner[key]
                    self._unblock(key)
