"""Caps on how many topics and consumer groups one Bus keeps, so anonymous callers cannot flood it.

Without authentication anyone who reaches the control plane may ``Subscribe``
with a new group or publish to a new topic, and every one of them is a row (or
a JetStream stream or consumer) that stays. :class:`BusCaps` bounds both; the
broker asks a :class:`CapLedger` before anything that would create a topic or a
durable group (CreateTopic, Publish, PublishStream and PublishEvent to a new
topic, Subscribe with a new group or on a new topic, a pattern subscription that
would join a new topic) and refuses with RESOURCE_EXHAUSTED, naming the limit
and the setting, before anything is created.

What counts: topics other than the reserved ``$dlq.*`` dead-letter topics
(there is at most one per group, and groups are capped), and durable consumer
groups (a broadcast subscription keeps no group). The counts are the ones this
Bus node knows: what it loaded at start plus what it created or found since.
With several Bus nodes on one NATS each node enforces its own view, so the
shared total can exceed a cap by what other nodes created since this one last
looked.

Admission reserves: a topic or group being created counts from the moment it is
admitted until its creation ends; :meth:`CapLedger.release` (in a ``finally``)
drops the reservations of a creation that failed or was cancelled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rpcmesh.controlplane.bus import topics
from rpcmesh.controlplane.bus.store import BusStore
from rpcmesh.controlplane.bus.validation import SubscriptionSettings
from rpcmesh.errors import ResourceExhaustedError

DEFAULT_MAX_TOPICS = 10_000
"""Default cap on topics per Bus."""

DEFAULT_MAX_GROUPS = 10_000
"""Default cap on durable consumer groups per Bus."""


@dataclass(frozen=True, kw_only=True)
class BusCaps:
    """How many topics and consumer groups one Bus keeps at most."""

    max_topics: int = DEFAULT_MAX_TOPICS
    """Most topics (dead-letter topics not counted); creating one more is RESOURCE_EXHAUSTED."""

    max_groups: int = DEFAULT_MAX_GROUPS
    """Most durable consumer groups (over all topics); creating one more is RESOURCE_EXHAUSTED."""

    def __post_init__(self) -> None:
        for name in ("max_topics", "max_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def counts_as_topic(name: str) -> bool:
    """Whether ``name`` counts against ``max_topics`` (dead-letter topics do not)."""
    return not name.startswith("$")


@dataclass
class Reservation:
    """Topics and groups one admitted creation may create; give it back with :meth:`CapLedger.release`."""

    topics: set[str] = field(default_factory=set)
    groups: set[tuple[str, str]] = field(default_factory=set)


class CapLedger:
    """The counts a Bus node enforces its :class:`BusCaps` with, and the admissions that use them.

    ``known_topics`` is the broker's own set of topic names (shared, not copied):
    the broker adds a topic there once it exists. Groups are recorded here with
    :meth:`group_exists` once created or found. The store is only asked whether a
    topic or group exists already.
    """

    def __init__(self, caps: BusCaps, known_topics: set[str], store: BusStore) -> None:
        self.caps = caps
        """The caps in force (a frozen value; replace it to change them)."""
        self._known_topics = known_topics
        self._store = store
        self._groups: set[tuple[str, str]] = set()
        self._pending_topics: set[str] = set()
        self._pending_groups: set[tuple[str, str]] = set()

    @property
    def topic_count(self) -> int:
        """Topics that count, existing or being created."""
        existing = sum(1 for name in self._known_topics if counts_as_topic(name))
        pending = sum(1 for name in self._pending_topics if name not in self._known_topics)
        return existing + pending

    @property
    def group_count(self) -> int:
        """Durable groups, existing or being created."""
        return len(self._groups) + sum(1 for key in self._pending_groups if key not in self._groups)

    def knows_group(self, topic: str, group: str) -> bool:
        """Whether the group exists or is being created."""
        key = (topic, group)
        return key in self._groups or key in self._pending_groups

    def group_exists(self, topic: str, group: str) -> None:
        """Record a group that exists (created, found in the store, or loaded at start)."""
        self._groups.add((topic, group))

    def forget_topic(self, topic: str) -> None:
        """The topic was deleted, with its groups."""
        self._groups = {key for key in self._groups if key[0] != topic}

    def admit(self, new_topics: Iterable[str], new_groups: Iterable[tuple[str, str]]) -> Reservation:
        """Reserve room for these topics and groups, or raise RESOURCE_EXHAUSTED and reserve nothing.

        Callers pass what their store said does not exist yet; names that became known
        or reserved in the meantime are not counted twice. Synchronous, so the check
        and the reservation cannot interleave with another admission.
        """
        wanted_topics = {
            name
            for name in new_topics
            if counts_as_topic(name) and name not in self._known_topics and name not in self._pending_topics
        }
        wanted_groups = {key for key in new_groups if not self.knows_group(*key)}
        if wanted_topics and self.topic_count + len(wanted_topics) > self.caps.max_topics:
            raise ResourceExhaustedError(
                f"bus: the topic limit is reached ({self.caps.max_topics} topics, the most allowed by "
                f"the Bus setting max_topics); {_names(wanted_topics)} not created"
            )
        if wanted_groups and self.group_count + len(wanted_groups) > self.caps.max_groups:
            groups = {f"{group}@{topic}" for topic, group in wanted_groups}
            raise ResourceExhaustedError(
                f"bus: the consumer group limit is reached ({self.caps.max_groups} groups, the most "
                f"allowed by the Bus setting max_groups); group@topic {_names(groups)} not created"
            )
        self._pending_topics |= wanted_topics
        self._pending_groups |= wanted_groups
        return Reservation(topics=wanted_topics, groups=wanted_groups)

    async def admit_topic(self, topic: str, patterns: Sequence[SubscriptionSettings]) -> Reservation:
        """Reserve room for ``topic`` and the groups ``patterns`` subscriptions would make on it, when new.

        No await before the reservation on the way that succeeds: concurrent batches of a
        PublishStream keep their order into the store.

        Raises:
            ResourceExhaustedError: past a cap; nothing is reserved.
        """
        if topic in self._known_topics:
            return Reservation()
        try:
            return self.admit([topic], _pattern_groups(topic, patterns, ()))
        except ResourceExhaustedError:
            # Before refusing, ask the store: another Bus node on the same NATS may have
            # created the topic (and groups on it) since this one last looked.
            stats = await self._store.get_topic(topic)
            if stats is None:
                raise
            for group in stats.groups:
                self.group_exists(topic, group)
            return self.admit([], _pattern_groups(topic, patterns, stats.groups))

    async def admit_subscription(
        self, settings: SubscriptionSettings, matching: Sequence[str]
    ) -> Reservation:
        """Reserve room for the topic and the durable groups a subscription would create.

        Raises:
            ResourceExhaustedError: past a cap; nothing is reserved.
        """
        if settings.broadcast:
            return Reservation()  # reads the log only: creates neither topics nor groups
        new_topics = []
        if (
            not topics.is_pattern(settings.topic)
            and settings.topic not in self._known_topics
            and await self._store.get_topic(settings.topic) is None
        ):
            new_topics.append(settings.topic)
        new_groups = []
        for name in matching:
            if self.knows_group(name, settings.group):
                continue
            if name not in new_topics and await self._store.load_group(name, settings.group) is not None:
                self.group_exists(name, settings.group)
            else:
                new_groups.append((name, settings.group))
        return self.admit(new_topics, new_groups)

    def release(self, reservation: Reservation) -> None:
        """End a creation: what it created is known by now; the rest stops counting."""
        self._pending_topics -= reservation.topics
        self._pending_groups -= reservation.groups
        reservation.topics.clear()
        reservation.groups.clear()


def _pattern_groups(
    topic: str, patterns: Sequence[SubscriptionSettings], existing: Sequence[str]
) -> set[tuple[str, str]]:
    """The groups that these pattern subscriptions would create on ``topic``."""
    return {
        (topic, settings.group)
        for settings in patterns
        if settings.group not in existing and topics.matches(settings.topic, topic)
    }


def _names(names: Iterable[str]) -> str:
    ordered = sorted(names)
    shown = ", ".join(repr(name) for name in ordered[:3])
    return shown + (f" and {len(ordered) - 3} more" if len(ordered) > 3 else "")


__all__ = [
    "DEFAULT_MAX_GROUPS",
    "DEFAULT_MAX_TOPICS",
    "BusCaps",
    "CapLedger",
    "Reservation",
    "counts_as_topic",
]
