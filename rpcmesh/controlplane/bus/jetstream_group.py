"""A Bus consumer group as a JetStream durable pull consumer.

Each (topic, group) is the durable consumer ``G_<group>_<hash>`` on the topic's
stream: explicit acks, ``ack_wait``/``backoff``/``max_deliver`` from
:mod:`consumer_policy`, and the group's delivery policy in the consumer's
description, so every Bus node serving the group applies the same policy
(the first subscription that creates the group sets it; later subscriptions'
policies are ignored on NATS). JetStream hands each message to one puller, so
several Bus nodes on one NATS share a group's work without double delivery.

Pulling: one pull request (``$JS.API.CONSUMER.MSG.NEXT``) is open at a time per
node and group, for as many messages as the node's members have room for, with
its own reply subject so that status replies (408 timeout, 409) of older
requests are told apart. Messages stream in as they are published.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import api

from rpcmesh.controlplane.bus.consumer_ledger import Fetched
from rpcmesh.controlplane.bus.consumer_policy import consumer_settings
from rpcmesh.controlplane.bus.group_state import DeliveryPolicy
from rpcmesh.v1 import bus_pb2

logger = logging.getLogger(__name__)

CONSUMER_PREFIX = "G"
PULL_EXPIRES = 1.0
"""Seconds a pull request stays open on the server."""
MAX_PULL = 1024
"""Most messages asked for at once."""
MAX_ACK_PENDING = 100_000
"""JetStream's cap on unacknowledged messages per group (over all nodes)."""
_DESCRIPTION_TAG = "rpcmesh-group"


def consumer_name(group: str) -> str:
    """The durable consumer name of ``group`` (sanitised, unique by hash)."""
    digest = hashlib.sha1(group.encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", group)[:64]
    return f"{CONSUMER_PREFIX}_{readable}_{digest}"


def describe(group: str, policy: DeliveryPolicy) -> str:
    """The consumer description: the group name and its delivery policy."""
    return json.dumps(
        {
            _DESCRIPTION_TAG: group,
            "ack_deadline": policy.ack_deadline,
            "max_deliveries": policy.max_deliveries,
            "redelivery_backoff": policy.redelivery_backoff,
        },
        sort_keys=True,
    )


def parse_description(description: str | None) -> tuple[str, DeliveryPolicy] | None:
    """The group and policy a consumer description holds, or None for other consumers."""
    if not description or _DESCRIPTION_TAG not in description:
        return None
    try:
        data = json.loads(description)
        policy = DeliveryPolicy(
            ack_deadline=float(data["ack_deadline"]),
            max_deliveries=int(data["max_deliveries"]),
            redelivery_backoff=float(data["redelivery_backoff"]),
        )
        return str(data[_DESCRIPTION_TAG]), policy
    except (ValueError, KeyError, TypeError):
        return None


def consumer_config(
    group: str, policy: DeliveryPolicy, start_sequence: int | None, filter_subject: str
) -> api.ConsumerConfig:
    """The durable consumer that serves ``group`` with ``policy``."""
    settings = consumer_settings(policy)
    return api.ConsumerConfig(
        durable_name=consumer_name(group),
        description=describe(group, policy),
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait,
        max_deliver=settings.max_deliver,
        backoff=list(settings.backoff) or None,
        deliver_policy=api.DeliverPolicy.NEW
        if start_sequence is None
        else api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_sequence,
        filter_subject=filter_subject,
        max_ack_pending=MAX_ACK_PENDING,
    )


def to_info(group: str, info: Any) -> bus_pb2.ConsumerGroupInfo:
    """A JetStream ConsumerInfo as the wire message."""
    in_flight = int(info.num_ack_pending or 0)
    return bus_pb2.ConsumerGroupInfo(
        name=group,
        pending=int(info.num_pending or 0) + in_flight,
        in_flight=in_flight,
        ack_floor=int(info.ack_floor.stream_seq) if info.ack_floor is not None else 0,
    )


class JetStreamGroupConsumer:
    """Pulls one group's messages for this node (implements ``GroupConsumer``)."""

    def __init__(
        self,
        *,
        nc: Any,
        js: Any,
        stream: str,
        group: str,
        policy: DeliveryPolicy,
        on_arrival: Callable[[], None],
        note_sequence: Callable[[int], None] = lambda seq: None,
    ) -> None:
        self.policy = policy
        self._note_sequence = note_sequence
        self.group = group
        self._nc = nc
        self._js = js
        self._stream = stream
        self._durable = consumer_name(group)
        self._on_arrival = on_arrival
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._arrived: list[Fetched] = []
        self._pulls = itertools.count(1)
        self._open_pull: str | None = None
        self._pull_left = 0
        self._pull_until = 0.0
        self._closing = False
        self._returning: list[Any] = []
        self._drainer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen on this node's inbox for pulled messages."""
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=self._on_msg)

    async def _on_msg(self, msg: Any) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status and not msg.data:
            if status != "100" and msg.subject == self._open_pull:
                self._open_pull = None
                self._on_arrival()
            return
        try:
            message = bus_pb2.BusMessage.FromString(msg.data)
            metadata = msg.metadata
        except Exception:
            logger.exception("undecodable message on consumer %s/%s", self._stream, self._durable)
            return
        if self._closing:
            self._returning.append(msg)  # returned once our open pull has ended (see close)
            return
        message.sequence = metadata.sequence.stream
        self._note_sequence(message.sequence)
        message.publish_time.FromNanoseconds(int(metadata.timestamp.timestamp() * 1e9))
        self._arrived.append(Fetched(message=message, attempts=int(metadata.num_delivered), handle=msg))
        # Delivered messages carry their stream subject, not the pull's reply
        # subject; with one pull open at a time they count against it.
        if self._open_pull is not None:
            self._pull_left -= 1
            if self._pull_left <= 0:
                self._open_pull = None
        self._on_arrival()

    async def pull(self, room: int) -> None:
        """Open a pull request for up to ``room`` messages unless one is open."""
        now = time.monotonic()
        if self._open_pull is not None and now > self._pull_until + 1.0:
            self._open_pull = None  # its 408 was lost (reconnect): ask again
        if self._open_pull is not None or room <= 0:
            return
        batch = min(room, MAX_PULL)
        reply = f"{self._inbox}.{next(self._pulls)}"
        self._open_pull = reply
        self._pull_left = batch
        self._pull_until = now + PULL_EXPIRES
        request = json.dumps({"batch": batch, "expires": int(PULL_EXPIRES * 1e9)}).encode()
        try:
            await self._nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{self._durable}", request, reply=reply
            )
        except Exception:
            self._open_pull = None
            logger.exception("pull on %s/%s failed", self._stream, self._durable)

    def pull_deadline(self) -> float | None:
        """When the open pull request runs out (monotonic), or None."""
        return self._pull_until if self._open_pull is not None else None

    def arrivals(self) -> list[Fetched]:
        """Messages pulled since the last call."""
        arrived, self._arrived = self._arrived, []
        return arrived

    async def settle(self, actions: Sequence[tuple[str, Any, float | None]]) -> None:
        """Send acks, naks, terms and in-progress notes to JetStream."""
        for kind, msg, delay in actions:
            try:
                if kind == "ack":
                    await msg.ack()
                elif kind == "nak":
                    await msg.nak(delay=delay if delay else None)
                elif kind == "term":
                    await msg.term()
                elif kind == "touch":
                    await msg.in_progress()
            except nats.errors.Error as exc:
                logger.debug("%s of %s failed: %s", kind, getattr(msg, "reply", "?"), exc)

    async def describe(self) -> bus_pb2.ConsumerGroupInfo:
        """Live figures from JetStream (over every node)."""
        return to_info(self.group, await self._js.consumer_info(self._stream, self._durable))

    async def close(self, returned: Sequence[Any] = ()) -> None:
        """Stop pulling and return ``returned`` (and whatever still arrives) for redelivery.

        A pull request still open on the server keeps handing messages to this
        node until it expires (at most ``PULL_EXPIRES``), and a message it
        hands to an inbox nobody reads only comes back after ``ack_wait``. So
        the inbox stays subscribed until then, late arrivals are kept, and
        everything is nakked only once the pull has ended: the redeliveries go
        to other pullers at once (a nak while the pull is open could come
        straight back here, costing a delivery attempt each time). This runs
        in the background (:meth:`wait_closed`).

        No ``flush()`` here: this runs when a subscription ends, possibly under
        cancellation, and a cancelled nats-py flush leaves a PONG future behind
        whose late answer breaks the client's read loop.
        """
        self._closing = True
        self._returning.extend(returned)
        linger = self._pull_until - time.monotonic() if self._open_pull is not None else 0.0

        async def drain() -> None:
            try:
                if linger > 0:
                    await asyncio.sleep(linger + 0.05)
            finally:
                await self._unsubscribe()
                returning, self._returning = self._returning, []
                await self.settle([("nak", msg, None) for msg in returning])

        self._drainer = asyncio.create_task(drain(), name="bus-consumer-drain")

    async def wait_closed(self) -> None:
        """Until :meth:`close` has returned everything."""
        if self._drainer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._drainer)

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def open_consumer(
    *,
    nc: Any,
    js: Any,
    stream: str,
    filter_subject: str,
    group: str,
    policy: DeliveryPolicy,
    start_sequence: int | None,
    on_arrival: Callable[[], None],
    note_sequence: Callable[[int], None] = lambda seq: None,
) -> JetStreamGroupConsumer:
    """Find or create the group's durable consumer and start pulling from it."""
    durable = consumer_name(group)
    try:
        info = await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        try:
            info = await js.add_consumer(
                stream, consumer_config(group, policy, start_sequence, filter_subject)
            )
        except nats.js.errors.BadRequestError:
            # Another node created it at the same moment (with other settings).
            info = await js.consumer_info(stream, durable)
    parsed = parse_description(info.config.description)
    effective = parsed[1] if parsed is not None else policy
    consumer = JetStreamGroupConsumer(
        nc=nc,
        js=js,
        stream=stream,
        group=group,
        policy=effective,
        on_arrival=on_arrival,
        note_sequence=note_sequence,
    )
    await consumer.start()
    return consumer
