"""Real PostgreSQL and NATS for backend tests: skip when absent, fail under RPCMESH_REQUIRE_BACKENDS=1.

On a developer machine without the servers, backend tests skip with the reason.
CI sets ``RPCMESH_REQUIRE_BACKENDS=1`` so that a missing server fails the run
instead of silently skipping the PostgreSQL and NATS suites.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

POSTGRES_HOST = os.environ.get("RPCMESH_TEST_PGHOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("RPCMESH_TEST_PGPORT", "5432"))
POSTGRES_ADMIN_DB = os.environ.get("RPCMESH_TEST_PGDATABASE", "test")
POSTGRES_USER = os.environ.get("RPCMESH_TEST_PGUSER", "postgres")
NATS_URL = os.environ.get("RPCMESH_TEST_NATS", "nats://127.0.0.1:4222")


def backends_required() -> bool:
    return os.environ.get("RPCMESH_REQUIRE_BACKENDS") == "1"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def unavailable(what: str, where: str) -> None:
    """Skip (or fail under RPCMESH_REQUIRE_BACKENDS=1) because a backend is down."""
    reason = f"{what} is not reachable at {where}"
    if backends_required():
        pytest.fail(f"{reason} and RPCMESH_REQUIRE_BACKENDS=1")
    pytest.skip(f"{reason} (set RPCMESH_REQUIRE_BACKENDS=1 to fail instead)")


def postgres_admin_url() -> str:
    return f"postgresql://{POSTGRES_USER}@{POSTGRES_HOST}:{POSTGRES_PORT}/{POSTGRES_ADMIN_DB}"


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Create an empty database for one test and drop it afterwards; yields its URL."""
    if not _reachable(POSTGRES_HOST, POSTGRES_PORT):
        unavailable("PostgreSQL", f"{POSTGRES_HOST}:{POSTGRES_PORT}")
    import psycopg

    name = f"rpcmesh_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin_url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{POSTGRES_USER}@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
    finally:
        with psycopg.connect(postgres_admin_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def nats_url() -> str:
    """The NATS URL, after checking that a server answers there."""
    host_port = NATS_URL.removeprefix("nats://")
    host, _, port = host_port.partition(":")
    if not _reachable(host, int(port or 4222)):
        unavailable("NATS JetStream", NATS_URL)
    return NATS_URL
