"""A running Registry node: the store, the materialized view, watchers and the lease-expiry loop.

Committed events come back from the store (directly for SQLite, by tailing the
shared log for PostgreSQL) and are applied here, in revision order, to the view
and then to the watchers, so every reader of this node sees one consistent
sequence. A write returns only once the view has caught up with it, so a
client reads its own writes on the node it wrote through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rpcmesh.controlplane.registry.model import DELETE, PUT, Committed, Event
from rpcmesh.controlplane.registry.settings import RegistrySettings
from rpcmesh.controlplane.registry.store import Decide, Loaded, RegistryStore
from rpcmesh.controlplane.registry.view import RegistryView
from rpcmesh.controlplane.registry.watch import WatchHub
from rpcmesh.tasks import start_supervised, stop_tasks
from rpcmesh.telemetry.setup import get_telemetry
from rpcmesh.v1 import registry_pb2

logger = logging.getLogger(__name__)

EventListener = Callable[[Event], None]

_HEALTH_NAMES = {
    registry_pb2.HEALTH_STATE_PASSING: "passing",
    registry_pb2.HEALTH_STATE_CRITICAL: "critical",
    registry_pb2.HEALTH_STATE_UNSPECIFIED: "unspecified",
}


class RegistryNode:
    """State and background work of one Registry process."""

    def __init__(self, store: RegistryStore, settings: RegistrySettings) -> None:
        self.store = store
        self.settings = settings
        self.view = RegistryView()
        self.hub = WatchHub(settings.max_watch_backlog)
        self.listeners: list[EventListener] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._expiry_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the store, build the view and start expiring leases."""
        loaded = await self.store.open(self._on_events, self._on_reset)
        self.view = RegistryView((stored.instance for stored in loaded.instances), loaded.revision)
        self._report_instances({instance.service for instance in self.view.instances()})
        self._expiry_task = start_supervised(self._expire_loop, name="registry-expiry")

    async def stop(self) -> None:
        """End watches, stop expiry and close the store."""
        self.hub.close()
        if self._expiry_task is not None:
            await stop_tasks([self._expiry_task])
            self._expiry_task = None
        await self.store.close()
        for _, future in self._waiters:
            if not future.done():
                future.cancel()
        self._waiters.clear()

    def _report_instances(self, services: Iterable[str]) -> None:
        """Set the ``rpcmesh.registry.instances`` gauge (by service and health) for ``services``."""
        metrics = get_telemetry().metrics
        if not metrics.enabled:
            return
        for service in services:
            counts = dict.fromkeys(_HEALTH_NAMES.values(), 0)
            for instance in self.view.instances(service):
                counts[_HEALTH_NAMES.get(instance.health, "unspecified")] += 1
            for health, count in counts.items():
                metrics.set_registry_instances(service, health, count)

    def _on_events(self, events: Sequence[Event]) -> None:
        changed: set[str] = set()
        for event in events:
            if not self.view.apply(event):
                continue
            changed.add(event.instance.service)
            self.hub.publish(event)
            for listener in self.listeners:
                try:
                    listener(event)
                except Exception:
                    logger.exception("registry event listener failed")
        if changed:
            self._report_instances(changed)
        if self._waiters:
            self._wake_waiters()

    def _on_reset(self, loaded: Loaded) -> None:
        """Rebuild the view from a snapshot; watches end (OUT_OF_RANGE) and listeners get the diff."""
        old = {(i.service, i.instance_id): i for i in self.view.instances()}
        self.view = RegistryView((stored.instance for stored in loaded.instances), loaded.revision)
        self.hub.reset(loaded.revision)
        new = {(i.service, i.instance_id): i for i in self.view.instances()}
        changes = [Event(loaded.revision, DELETE, old[key]) for key in old.keys() - new.keys()]
        changes += [Event(loaded.revision, PUT, new[key]) for key in new if old.get(key) != new[key]]
        for event in changes:
            for listener in self.listeners:
                try:
                    listener(event)
                except Exception:
                    logger.exception("registry event listener failed")
        self._report_instances({key[0] for key in old.keys() | new.keys()})
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        revision = self.view.revision
        still_waiting = []
        for wanted, future in self._waiters:
            if wanted <= revision:
                if not future.done():
                    future.set_result(None)
            else:
                still_waiting.append((wanted, future))
        self._waiters = still_waiting

    async def caught_up(self, revision: int) -> None:
        """Wait until the view reflects ``revision``."""
        if self.view.revision >= revision:
            return
        entry = (revision, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        finally:
            # A waiter given up (cancelled, timed out) must not stay behind.
            if entry in self._waiters:
                self._waiters.remove(entry)

    async def mutate(self, service: str, instance_id: str, decide: Decide[Any]) -> Committed[Any]:
        """Commit a decision and wait until this node's view shows it."""
        committed = await self.store.mutate(service, instance_id, decide)
        await self.caught_up(committed.revision)
        return committed

    async def _expire_loop(self) -> None:
        """Expire due leases; supervised, so even an unexpected error restarts it after a backoff."""
        while True:
            delay = min(self.store.seconds_to_next_expiry(), self.settings.expiry_check_interval)
            await asyncio.sleep(delay)
            try:
                expired = await self.store.expire_due()
            except Exception:
                logger.exception("lease expiry failed; retrying")
                await asyncio.sleep(1.0)
                continue
            if expired:
                logger.info("expired %d lease(s)", expired)
