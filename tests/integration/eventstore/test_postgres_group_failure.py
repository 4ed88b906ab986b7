"""PostgreSQL: a group whose transaction fails as a whole is retried append by append."""

from __future__ import annotations

import asyncio

import psycopg

from rpcmesh.controlplane.eventstore.model import ANY, NewEvent
from rpcmesh.controlplane.eventstore.postgres import PostgresEventStorage


async def test_a_member_that_breaks_the_transaction_fails_alone(postgres_url: str) -> None:
    storage = PostgresEventStorage(postgres_url)
    await storage.open()
    try:
        # NUL cannot go into a PostgreSQL text column: that member breaks the whole
        # group's statement (the servicer refuses it earlier; storage users may not).
        bad = NewEvent(event_id="bad", event_type="T\x00")
        goods = [
            storage.append(f"g-{i}", ANY, [NewEvent(event_id=f"e{i}", event_type="T")]) for i in range(6)
        ]
        results = await asyncio.gather(
            *goods[:3], storage.append("b", ANY, [bad]), *goods[3:], return_exceptions=True
        )
        assert isinstance(results[3], psycopg.DataError), results[3]
        good = [r for i, r in enumerate(results) if i != 3]
        assert all(not isinstance(r, BaseException) and r.appended == 1 for r in good), good
        assert sorted(r.position for r in good) == list(range(1, 7))  # type: ignore[union-attr]
        events, head = await storage.read_all(1, limit=100)
        assert head == 6 and [e.position for e in events] == list(range(1, 7))
    finally:
        await storage.close()
