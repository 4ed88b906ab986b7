"""The Bus store on NATS JetStream: one stream per topic, one durable consumer per group.

Mapping:

* topic ``orders.created`` -> stream ``RMB_orders_created_<hash>`` with subject
  ``rpcmesh.bus.orders.created``; retention maps onto the stream's max_msgs,
  max_bytes and max_age, deduplication onto its duplicate window (the message
  id travels as ``Nats-Msg-Id``). Stream names are sanitised and hashed so that
  any topic name maps to a valid, unique stream; the topic name is kept in the
  stream description.
* an append publishes every message of the batch asynchronously (pipelined)
  and returns once JetStream acknowledged all of them.
* a consumer group is a JetStream durable pull consumer on the topic's stream
  (:mod:`jetstream_group`): JetStream tracks deliveries, redelivery counts,
  acks and the ack floor, so several Bus nodes on one NATS share a group.
* request/reply across Bus nodes (presence probes, forwarded replies) runs on
  core NATS (:mod:`node_link`).
* broadcast subscriptions and dead-letter listing read the log with
  ephemeral pull consumers (no acks) positioned by sequence; a reader is kept
  per position so sequential reads reuse it. A fetch that comes back empty is
  no proof (a loaded server may answer late), so an empty read asks JetStream
  directly for the next stored message before it answers "nothing".
* JetStream lists streams and consumers 256 a page: every listing here pages
  through to the end, and a topic this node has not seen (created by another
  node, or after this one started) is looked up by its stream name.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import re
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from rpcmesh.controlplane.bus import jetstream_group
from rpcmesh.controlplane.bus.group_state import DeliveryPolicy
from rpcmesh.controlplane.bus.node_link import NodeLink
from rpcmesh.controlplane.bus.store import AppendResult, GroupRecord, RetentionPolicy, TopicStats
from rpcmesh.errors import NotFoundError, UnavailableError
from rpcmesh.tasks import stop_tasks
from rpcmesh.v1 import bus_pb2

logger = logging.getLogger(__name__)

STREAM_PREFIX = "RMB"
SUBJECT_PREFIX = "rpcmesh.bus."
DEFAULT_DEDUP_WINDOW = 120.0
SEQUENCE_AT_TIMEOUTS = (0.5, 2.0, 5.0)
"""Fetches tried to find the first message at or after a time, while one is known to exist."""
FETCH_TIMEOUT = 0.2
"""Seconds a reader's fetch waits; an empty answer is then checked with JetStream (see read)."""
DEFAULT_PING_INTERVAL = 5.0
"""Seconds between the node's pings to its nats-server. nats-py's default, 120 s with two unanswered
allowed, left a node on a frozen or cut-off server (SIGSTOP, a blackholed route: the TCP connection
stays open) stuck for 4-6 minutes; now it moves to another server of the cluster within 10-15 s."""
MAX_OUTSTANDING_PINGS = 2

NO_MESSAGE_FOUND = 10057
"""JetStream's err_code for deleting a message that is not (or no longer) stored."""
REFRESH_INTERVAL = 0.25
MAX_READERS_PER_TOPIC = 8


def stream_name(topic: str) -> str:
    """The JetStream stream holding ``topic``."""
    digest = hashlib.sha1(topic.encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", topic)[:120]
    return f"{STREAM_PREFIX}_{readable}_{digest}"


def subject(topic: str) -> str:
    """The NATS subject messages of ``topic`` are published on."""
    return SUBJECT_PREFIX + topic


@dataclass
class _Reader:
    sub: Any
    next_seq: int
    used: float = field(default_factory=time.monotonic)


@dataclass
class _TopicCache:
    stream: str
    retention: RetentionPolicy
    last_seq: int = 0
    readers: dict[int, _Reader] = field(default_factory=dict)
    watched: float = 0.0


class NatsBusStore:
    """The Bus log on NATS JetStream (see module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
        replicas: int = 1,
        ping_interval: float = DEFAULT_PING_INTERVAL,
    ) -> None:
        self.url = url
        self.dedup_window = dedup_window
        self.replicas = replicas
        self.ping_interval = ping_interval
        self._nc: Any = None
        self._js: Any = None
        self._consumers: weakref.WeakSet[jetstream_group.JetStreamGroupConsumer] = weakref.WeakSet()
        self.node_link: NodeLink | None = None
        """Request/reply between Bus nodes on this NATS (set once open)."""
        self._topics: dict[str, _TopicCache] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tails: dict[str, asyncio.Future[None]] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}{int(time.time() * 1000):x}-"

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and load topics."""
        try:
            servers = [part.strip() for part in self.url.split(",") if part.strip()]
            self._nc = await nats.connect(
                servers,
                connect_timeout=5,
                max_reconnect_attempts=-1,
                ping_interval=self.ping_interval,
                max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            )
        except Exception as exc:
            raise UnavailableError(f"bus: cannot connect to NATS at {self.url}: {exc}") from exc
        self._js = self._nc.jetstream(publish_async_max_pending=20_000)
        self.node_link = NodeLink(self._nc)
        await self._load_topics()
        self._refresher = asyncio.create_task(self._refresh_loop(), name="bus-nats-refresh")

    async def close(self) -> None:
        """Close readers and the connection."""
        if self._refresher is not None:
            await stop_tasks([self._refresher])  # its stream_info calls can swallow one cancel
        for cache in self._topics.values():
            for reader in cache.readers.values():
                with contextlib.suppress(Exception):
                    await reader.sub.unsubscribe()
            cache.readers.clear()
        for consumer in list(self._consumers):
            await consumer.wait_closed()  # at most PULL_EXPIRES: nothing is left in a dead inbox
        if self.node_link is not None:
            await self.node_link.close()
            self.node_link = None
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._js.publish_async_completed()
            await self._nc.close()
            self._nc = None

    async def _load_topics(self) -> list[TopicStats]:
        found = []
        for info in await self._all_streams():
            config = info.config
            if not (config.name or "").startswith(STREAM_PREFIX + "_") or not config.description:
                continue
            stats = self._remember(config.description, info)
            found.append(stats)
        return found

    async def _all_streams(self) -> list[Any]:
        """Every stream's info: JetStream answers a page (256) at a time."""
        streams: dict[str, Any] = {}
        offset = 0
        while True:
            page = await self._js.streams_info(offset=offset)
            if not page:
                return list(streams.values())
            offset += len(page)
            streams.update((info.config.name, info) for info in page)

    async def _known(self, topic: str) -> _TopicCache | None:
        """This node's entry for ``topic``, looking its stream up when the node has not seen it."""
        cache = self._topics.get(topic)
        if cache is not None:
            return cache
        try:
            info = await self._js.stream_info(stream_name(topic))
        except nats.js.errors.NotFoundError:
            return None
        self._remember(topic, info)
        return self._topics[topic]

    def _remember(self, topic: str, info: Any) -> TopicStats:
        config = info.config
        retention = RetentionPolicy(
            max_messages=max(0, config.max_msgs or 0),
            max_bytes=max(0, config.max_bytes or 0),
            max_age=float(config.max_age or 0.0),
        )
        cache = self._topics.get(topic)
        if cache is None:
            cache = self._topics[topic] = _TopicCache(stream=config.name, retention=retention)
        cache.retention = retention
        cache.last_seq = max(cache.last_seq, info.state.last_seq)
        empty = info.state.messages == 0
        return TopicStats(
            name=topic,
            retention=retention,
            first_sequence=info.state.last_seq + 1 if empty else info.state.first_seq,
            last_sequence=info.state.last_seq,
            message_count=info.state.messages,
        )

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL)
            now = time.monotonic()
            for cache in list(self._topics.values()):
                if now - cache.watched > 5.0:
                    continue
                with contextlib.suppress(Exception):
                    info = await self._js.stream_info(cache.stream)
                    cache.last_seq = max(cache.last_seq, info.state.last_seq)

    # -- topics ----------------------------------------------------------------------

    def _stream_config(self, topic: str, retention: RetentionPolicy) -> api.StreamConfig:
        return api.StreamConfig(
            name=stream_name(topic),
            description=topic,
            subjects=[subject(topic)],
            storage=api.StorageType.FILE,
            num_replicas=self.replicas,
            max_msgs=retention.max_messages or -1,
            max_bytes=retention.max_bytes or -1,
            max_age=retention.max_age or 0.0,
            # JetStream refuses a duplicate window longer than max_age.
            duplicate_window=min(self.dedup_window, retention.max_age)
            if retention.max_age
            else self.dedup_window,
        )

    async def _ensure(self, topic: str, retention: RetentionPolicy) -> tuple[_TopicCache, bool]:
        cache = self._topics.get(topic)
        if cache is not None:
            return cache, False
        lock = self._locks.setdefault(topic, asyncio.Lock())
        async with lock:
            cache = self._topics.get(topic)
            if cache is not None:
                return cache, False
            name = stream_name(topic)
            created = False
            try:
                info = await self._js.stream_info(name)
            except nats.js.errors.NotFoundError:
                info = await self._js.add_stream(self._stream_config(topic, retention))
                created = True
            self._remember(topic, info)
            return self._topics[topic], created

    async def create_topic(self, name: str, retention: RetentionPolicy) -> tuple[TopicStats, bool]:
        """Create the topic's stream (or find it)."""
        _, created = await self._ensure(name, retention)
        stats = await self.get_topic(name)
        assert stats is not None
        return stats, created

    async def get_topic(self, name: str) -> TopicStats | None:
        """The topic's stream state and groups."""
        try:
            info = await self._js.stream_info(stream_name(name))
        except nats.js.errors.NotFoundError:
            self._topics.pop(name, None)
            return None
        stats = self._remember(name, info)
        groups = tuple(sorted(await self._group_names(self._topics[name].stream)))
        return TopicStats(
            name=stats.name,
            retention=stats.retention,
            first_sequence=stats.first_sequence,
            last_sequence=stats.last_sequence,
            message_count=stats.message_count,
            groups=groups,
        )

    async def _group_names(self, stream: str) -> list[str]:
        names: set[str] = set()
        offset = 0
        while True:  # JetStream answers a page (256 consumers, readers included) at a time
            try:
                page = await self._js.consumers_info(stream, offset=offset)
            except nats.js.errors.NotFoundError:
                return []
            if not page:
                return sorted(names)
            offset += len(page)
            for info in page:
                parsed = jetstream_group.parse_description(info.config.description)
                if parsed is not None and info.config.durable_name:
                    names.add(parsed[0])

    async def list_topics(self, after: str, limit: int) -> list[TopicStats]:
        """Topics sorted by name, after ``after``."""
        names = sorted(stats.name for stats in await self._load_topics() if stats.name > after)[:limit]
        result = []
        for name in names:
            stats = await self.get_topic(name)
            if stats is not None:
                result.append(stats)
        return result

    async def delete_topic(self, name: str) -> bool:
        """Delete the stream (with its consumers, the groups)."""
        stream = stream_name(name)
        cache = self._topics.pop(name, None)
        if cache is not None:
            for reader in cache.readers.values():
                with contextlib.suppress(Exception):
                    await reader.sub.unsubscribe()
        try:
            return bool(await self._js.delete_stream(stream))
        except nats.js.errors.NotFoundError:
            return False

    async def purge_prefix(self, prefix: str) -> None:
        """Delete every topic whose name mentions the token ``prefix`` (test clean-up)."""
        for stats in await self._load_topics():
            if prefix in stats.name.split("."):
                await self.delete_topic(stats.name)

    def last_sequence(self, topic: str) -> int:
        """The newest sequence known to this process."""
        cache = self._topics.get(topic)
        if cache is None:
            return 0
        cache.watched = time.monotonic()
        return cache.last_seq

    # -- messages --------------------------------------------------------------------

    async def append(
        self, topic: str, messages: Sequence[bus_pb2.BusMessage], *, dedup: bool = True
    ) -> list[AppendResult]:
        """Publish the batch pipelined; returns once JetStream acknowledged every message."""
        # Batches of one topic are written in call order (so sequences follow
        # batch order): each call takes its turn, synchronously, before any
        # await; acks are then awaited outside the turn, pipelined.
        previous = self._tails.get(topic)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[topic] = turn
        futures = []
        try:
            if previous is not None:
                await asyncio.shield(previous)
            cache, _ = await self._ensure(topic, RetentionPolicy())
            target = subject(topic)
            for message in messages:
                headers = None
                if message.id and dedup:
                    headers = {"Nats-Msg-Id": message.id}
                elif not message.id:
                    message.id = f"{self._id_prefix}{next(self._ids):x}"
                message.topic = topic
                body = message.SerializeToString()
                futures.append(await self._js.publish_async(target, body, headers=headers))
        finally:
            turn.set_result(None)
            if self._tails.get(topic) is turn:
                del self._tails[topic]
        try:
            acks = await asyncio.gather(*futures)
        except Exception as exc:
            raise UnavailableError(f"bus: NATS JetStream did not acknowledge the publish: {exc}") from exc
        now_ns = time.time_ns()
        results = []
        for message, ack in zip(messages, acks, strict=True):
            message.sequence = ack.seq
            message.publish_time.FromNanoseconds(now_ns)
            cache.last_seq = max(cache.last_seq, ack.seq)
            results.append(AppendResult(id=message.id, sequence=ack.seq, duplicate=bool(ack.duplicate)))
        return results

    async def _reader(self, topic: str, cache: _TopicCache, from_sequence: int) -> _Reader:
        reader = cache.readers.pop(from_sequence, None)
        if reader is not None:
            return reader
        if len(cache.readers) >= MAX_READERS_PER_TOPIC:
            oldest = min(cache.readers, key=lambda seq: cache.readers[seq].used)
            stale = cache.readers.pop(oldest)
            with contextlib.suppress(Exception):
                await stale.sub.unsubscribe()
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=from_sequence,
            inactive_threshold=60.0,
            mem_storage=True,
        )
        sub = await self._js.pull_subscribe(subject(topic), stream=cache.stream, config=config)
        return _Reader(sub=sub, next_seq=from_sequence)

    async def read(self, topic: str, from_sequence: int, limit: int) -> tuple[list[bus_pb2.BusMessage], int]:
        """Up to ``limit`` messages from ``from_sequence`` on."""
        cache = await self._known(topic)
        if cache is None or from_sequence > cache.last_seq:
            return [], from_sequence - 1
        last_known = cache.last_seq
        reader = await self._reader(topic, cache, from_sequence)
        try:
            raw = await reader.sub.fetch(min(limit, 4096), timeout=FETCH_TIMEOUT)
        except (TimeoutError, nats.errors.TimeoutError):
            raw = []
        if not raw:
            # Empty is no proof under load: ask JetStream for the next stored message.
            stored = await self._next_stored(cache, topic, from_sequence)
            if stored is None:
                # Nothing from from_sequence through last_known exists (deleted or expired).
                if last_known + 1 in cache.readers:
                    with contextlib.suppress(Exception):
                        await reader.sub.unsubscribe()
                else:
                    cache.readers[last_known + 1] = _Reader(sub=reader.sub, next_seq=last_known + 1)
                return [], last_known
            # Answer with that message; the reader (its pull may still answer late) is dropped,
            # and the next read starts a fresh one after it.
            with contextlib.suppress(Exception):
                await reader.sub.unsubscribe()
            return [stored], stored.sequence
        messages = []
        for item in raw:
            message = bus_pb2.BusMessage.FromString(item.data)
            metadata = item.metadata
            message.sequence = metadata.sequence.stream
            message.publish_time.FromNanoseconds(int(metadata.timestamp.timestamp() * 1e9))
            messages.append(message)
        through = messages[-1].sequence
        reader.next_seq = through + 1
        reader.used = time.monotonic()
        cache.readers[reader.next_seq] = reader
        return messages, through

    async def _next_stored(
        self, cache: _TopicCache, topic: str, from_sequence: int
    ) -> bus_pb2.BusMessage | None:
        """The first message stored at or after ``from_sequence``, asked of JetStream directly."""
        try:
            raw = await self._js.get_msg(cache.stream, seq=from_sequence, subject=subject(topic), next=True)
        except nats.js.errors.NotFoundError:
            return None
        message = bus_pb2.BusMessage.FromString(raw.data or b"")
        message.sequence = int(raw.seq or 0)
        if raw.time is not None:
            message.publish_time.FromNanoseconds(int(raw.time.timestamp() * 1e9))
        return message

    async def sequence_at(self, topic: str, time_ns: int) -> int:
        """The first sequence published at or after ``time_ns``."""
        cache = await self._known(topic)
        if cache is None:
            return 1
        from datetime import UTC, datetime

        start = datetime.fromtimestamp(time_ns / 1e9, tz=UTC)
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.BY_START_TIME,
            opt_start_time=start,
            inactive_threshold=5.0,
            mem_storage=True,
        )
        sub = await self._js.pull_subscribe(subject(topic), stream=cache.stream, config=config)
        try:
            for timeout in SEQUENCE_AT_TIMEOUTS:
                try:
                    found = await sub.fetch(1, timeout=timeout)
                    return int(found[0].metadata.sequence.stream)
                except (TimeoutError, nats.errors.TimeoutError):
                    pass
                # No answer is no proof (a loaded server): only the newest message says nothing is newer.
                try:
                    newest = await self._js.get_msg(cache.stream, subject=subject(topic))
                except nats.js.errors.NotFoundError:
                    return cache.last_seq + 1  # the stream holds nothing
                if newest.time is None or newest.time < start:
                    return int(newest.seq or cache.last_seq) + 1
            raise UnavailableError(
                f"bus: JetStream did not say where {start.isoformat()} starts in {topic!r}"
            )
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def delete_messages(self, topic: str, sequences: Sequence[int]) -> int:
        """Remove single messages from the stream."""
        cache = await self._known(topic)
        if cache is None:
            raise NotFoundError(f"topic {topic!r} does not exist")
        removed = 0
        for seq in sequences:
            try:
                if await self._js.delete_msg(cache.stream, seq):
                    removed += 1
            except nats.js.errors.NotFoundError:
                pass
            except nats.js.errors.APIError as exc:
                # A message already deleted (a concurrent replay or purge) answers 500
                # "no message found" (err_code 10057), not 404.
                if exc.err_code != NO_MESSAGE_FOUND:
                    raise
        return removed

    async def enforce_retention(self, now_ns: int) -> None:
        """JetStream enforces max_age itself."""

    # -- groups ----------------------------------------------------------------------

    async def open_group_consumer(
        self,
        topic: str,
        group: str,
        policy: DeliveryPolicy,
        start_sequence: int | None,
        on_arrival: Callable[[], None],
    ) -> jetstream_group.JetStreamGroupConsumer:
        """Find or create the group's durable consumer and pull from it."""
        cache, _ = await self._ensure(topic, RetentionPolicy())

        def note_sequence(seq: int) -> None:
            # Messages published through other Bus nodes arrive here first.
            cache.last_seq = max(cache.last_seq, seq)

        consumer = await jetstream_group.open_consumer(
            nc=self._nc,
            js=self._js,
            stream=cache.stream,
            filter_subject=subject(topic),
            group=group,
            policy=policy,
            start_sequence=start_sequence,
            on_arrival=on_arrival,
            note_sequence=note_sequence,
        )
        self._consumers.add(consumer)
        return consumer

    async def describe_group(self, topic: str, group: str) -> bus_pb2.ConsumerGroupInfo | None:
        """The group's figures from its consumer, or None."""
        try:
            info = await self._js.consumer_info(stream_name(topic), jetstream_group.consumer_name(group))
        except nats.js.errors.NotFoundError:
            return None
        return jetstream_group.to_info(group, info)

    async def load_group(self, topic: str, name: str) -> GroupRecord | None:
        """The group's ack floor from its consumer (JetStream keeps the rest)."""
        info = await self.describe_group(topic, name)
        if info is None:
            return None
        return GroupRecord(topic=topic, name=name, ack_floor=info.ack_floor)

    async def save_group(self, record: GroupRecord) -> None:
        """Nothing to do: JetStream keeps group progress in the consumer."""
