"""SQLite specifics: durability across reopen, index-served filters, WAL settings."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from rpcmesh.controlplane.eventstore.model import ANY, NewEvent
from rpcmesh.controlplane.eventstore.sqlite import SqliteEventStorage


async def test_events_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    storage = SqliteEventStorage(path)
    await storage.open()
    try:
        await storage.append("s", ANY, [NewEvent(event_id="1", event_type="T", data=b"a")])
    finally:
        await storage.close()
    again = SqliteEventStorage(path)
    await again.open()
    try:
        result = await again.append("s", 0, [NewEvent(event_id="2", event_type="T")])
        assert (result.current_revision, result.position) == (1, 2)
        events, current = await again.read_stream("s", 0, backwards=False, limit=10)
        assert [e.data for e in events] == [b"a", b""] and current == 1
    finally:
        await again.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_filtered_reads_use_an_index(tmp_path: Path) -> None:
    storage = SqliteEventStorage(tmp_path / "events.db")
    await storage.open()
    try:
        by_type = await storage.explain_read_all(["Placed"], [])
        assert "USING INDEX events_by_type" in by_type, by_type
        by_prefix = await storage.explain_read_all([], ["order-"])
        assert "USING INDEX events_by_stream_position" in by_prefix, by_prefix
        assert "SCAN events" not in by_type + by_prefix
    finally:
        await storage.close()
