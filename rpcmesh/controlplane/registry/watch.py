"""Fan-out of committed events to watchers, each with a bounded backlog.

The hub is fed synchronously, in revision order, by whoever applies events to
the view, so a watcher that subscribes and reads the view in the same step of
the event loop misses nothing. A watcher that falls more than ``max_backlog``
events behind is cut off with ABORTED and told where to resume, rather than
letting the server's memory grow without bound. When the node rebuilds its view
from a snapshot (its store could not replay what it missed), every watch is
ended with OUT_OF_RANGE: its client must take a snapshot too.
"""

from __future__ import annotations

import asyncio
from collections import deque

from rpcmesh.controlplane.registry.model import Event
from rpcmesh.errors import AbortedError, OutOfRangeError, StatusError, UnavailableError


class Subscription:
    """One watcher's queue of events for one service (or all, when service is empty)."""

    def __init__(self, hub: WatchHub, service: str, max_backlog: int) -> None:
        self.service = service
        self._hub = hub
        self._max_backlog = max_backlog
        self._events: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self._overflowed_after: int | None = None
        self._closed = False
        self._ended: StatusError | None = None
        self.delivered = 0
        """Highest revision handed out by :meth:`next_batch`."""

    def push(self, event: Event) -> None:
        """Queue an event (called by the hub)."""
        if self._overflowed_after is not None or self._closed or self._ended is not None:
            return
        if self.service and event.instance.service != self.service:
            return
        if len(self._events) >= self._max_backlog:
            self._overflowed_after = self._events[0].revision - 1
            self._events.clear()
        else:
            self._events.append(event)
        self._wakeup.set()

    def close(self) -> None:
        """End the watch (the registry is stopping)."""
        self._closed = True
        self._wakeup.set()

    def end(self, error: StatusError) -> None:
        """End the watch with ``error`` (raised once the queued events are taken)."""
        self._ended = error
        self._wakeup.set()

    async def next_batch(self, limit: int = 1000) -> list[Event]:
        """Wait for at least one event and return up to ``limit`` in revision order."""
        while not self._events:
            if self._overflowed_after is not None:
                raise AbortedError(
                    f"watch fell more than {self._max_backlog} events behind; "
                    f"resume with after_revision={max(self._overflowed_after, self.delivered)}"
                )
            if self._ended is not None:
                raise self._ended
            if self._closed:
                raise UnavailableError("registry is shutting down; resume the watch elsewhere")
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = [self._events.popleft() for _ in range(min(limit, len(self._events)))]
        self.delivered = batch[-1].revision
        return batch

    def unsubscribe(self) -> None:
        """Stop receiving events."""
        self._hub.remove(self)


class WatchHub:
    """The set of live subscriptions of one registry node."""

    def __init__(self, max_backlog: int = 10_000) -> None:
        self.max_backlog = max_backlog
        self._subscriptions: set[Subscription] = set()

    def __len__(self) -> int:
        return len(self._subscriptions)

    def subscribe(self, service: str = "") -> Subscription:
        """A new subscription; it sees every event published after this call."""
        subscription = Subscription(self, service, self.max_backlog)
        self._subscriptions.add(subscription)
        return subscription

    def remove(self, subscription: Subscription) -> None:
        """Drop a subscription."""
        self._subscriptions.discard(subscription)

    def publish(self, event: Event) -> None:
        """Hand a committed event to every subscription."""
        for subscription in self._subscriptions:
            subscription.push(event)

    def reset(self, revision: int) -> None:
        """End every watch with OUT_OF_RANGE: the view was rebuilt at ``revision`` from a snapshot."""
        for subscription in list(self._subscriptions):
            subscription.end(
                OutOfRangeError(
                    f"after_revision: this registry node reloaded its state at revision {revision} "
                    "and cannot replay the events before it; watch again from 0 for a snapshot"
                )
            )
        self._subscriptions.clear()

    def close(self) -> None:
        """End every watch."""
        for subscription in list(self._subscriptions):
            subscription.close()
        self._subscriptions.clear()
