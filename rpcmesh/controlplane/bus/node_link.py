"""Request/reply between Bus nodes that share one NATS server (core NATS, not JetStream).

With several ``rpcmesh up --bus nats://…`` processes, a requester and its
responder may be attached to different nodes. Two things then need the other
nodes:

* **Presence** ("no responders"): every node listens on
  ``rpcmesh.bus.presence.<pattern>`` for each topic pattern it has open
  subscriptions on (NATS wildcards are the Bus's own), and answers a probe.
  A node that has no local subscriber probes ``rpcmesh.bus.presence.<topic>``;
  NATS answers "no responders" at once when nobody listens.
* **Replies**: a node listens on ``rpcmesh.bus.reply.<node id>``. A Reply for
  a request taken by another node is forwarded there as a NATS request; the
  owning node answers whether the request was still waiting (``delivered``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import nats.errors

from rpcmesh.v1 import bus_pb2

logger = logging.getLogger(__name__)

PRESENCE_PREFIX = "rpcmesh.bus.presence."
REPLY_PREFIX = "rpcmesh.bus.reply."
PROBE_TIMEOUT = 0.5
"""Seconds a presence probe waits for an answer (no answer in time counts as present)."""
FORWARD_TIMEOUT = 5.0
"""Seconds a forwarded reply waits for the requesting node to take it (a busy node answers late)."""


class NodeLink:
    """One Bus node's core-NATS side (see module docstring)."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._presence: dict[str, tuple[Any, int]] = {}
        self._reply_sub: Any = None

    async def listen_replies(self, node_id: str, on_reply: Callable[[bus_pb2.BusMessage], bool]) -> None:
        """Take replies forwarded by other nodes for requests this node holds."""

        async def handle(msg: Any) -> None:
            try:
                delivered = on_reply(bus_pb2.BusMessage.FromString(msg.data))
            except Exception:
                logger.exception("forwarded reply failed")
                delivered = False
            with contextlib.suppress(Exception):
                await msg.respond(b"1" if delivered else b"0")

        self._reply_sub = await self._nc.subscribe(REPLY_PREFIX + node_id, cb=handle)

    async def forward_reply(self, node_id: str, message: bus_pb2.BusMessage) -> bool:
        """Hand a reply to the node holding the request; False when it is gone or finished."""
        try:
            answer = await self._nc.request(
                REPLY_PREFIX + node_id, message.SerializeToString(), timeout=FORWARD_TIMEOUT
            )
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError):
            return False
        return bool(answer.data == b"1")

    async def announce(self, pattern: str) -> None:
        """This node has a subscriber on ``pattern`` (counted)."""
        sub, count = self._presence.get(pattern, (None, 0))
        if sub is None:

            async def answer(msg: Any) -> None:
                with contextlib.suppress(Exception):
                    await msg.respond(b"1")

            sub = await self._nc.subscribe(PRESENCE_PREFIX + pattern, cb=answer)
        self._presence[pattern] = (sub, count + 1)

    async def withdraw(self, pattern: str) -> None:
        """One subscriber on ``pattern`` left."""
        sub, count = self._presence.get(pattern, (None, 0))
        if sub is None:
            return
        if count > 1:
            self._presence[pattern] = (sub, count - 1)
            return
        del self._presence[pattern]
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    async def anyone_subscribed(self, topic: str) -> bool:
        """True when some node has a subscriber matching ``topic``."""
        try:
            await self._nc.request(PRESENCE_PREFIX + topic, b"", timeout=PROBE_TIMEOUT)
        except nats.errors.NoRespondersError:
            return False
        except (nats.errors.TimeoutError, TimeoutError):
            # Someone listens but did not answer in time: assume present and let
            # the request time out rather than refuse it wrongly.
            return True
        return True

    async def close(self) -> None:
        """Stop listening."""
        subs = [sub for sub, _ in self._presence.values()]
        if self._reply_sub is not None:
            subs.append(self._reply_sub)
        self._presence.clear()
        self._reply_sub = None
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
