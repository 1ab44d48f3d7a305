"""SHOP_POOL_PRE_PING in one round trip, and only for connections that sat idle.

SQLAlchemy's own pre-ping for asyncpg wraps its ping in BEGIN ... ROLLBACK: three round trips on
every checkout, more than a GetUser itself. This one sends one simple query (no prepared
statement, so it is safe behind pgbouncer too) and, when it fails, lets the pool replace the
connection as pre-ping does.

A connection checked in less than `idle_seconds` ago is handed out unpinged: under load every
checkout finds such a connection, and its ping would double a one-statement RPC's round trips
(docs/benchmark-profiles.md). A server that died in that short window is found by the statement
itself: the error is a disconnect, SQLAlchemy invalidates the whole pool, and every other
connection is replaced on its next checkout, so an outage costs the calls in flight and no more
(tests/faults/test_outage.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_

_CHECKED_IN = "shop_checked_in_at"
# Simple query protocol: no prepared statement. (asyncpg fails on an empty query.)
PRE_PING = "SELECT 1"


def _ping(dbapi_connection: Any) -> None:
    try:
        await_(dbapi_connection.driver_connection.execute(PRE_PING))
    except Exception as exc:
        # DisconnectionError: the pool discards this connection and checks out another.
        raise DisconnectionError("pre-ping failed") from exc


def ping_on_checkout(engine: AsyncEngine, idle_seconds: float = 0.0) -> None:
    """Check each connection that was idle for idle_seconds or more as it leaves the pool
    (instead of create_engine's pool_pre_ping, which checks every one)."""
    pool = engine.sync_engine.pool

    @event.listens_for(pool, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[_CHECKED_IN] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        # A new connection has no check-in time: it was just opened, so it is alive.
        checked_in = record.info.get(_CHECKED_IN)
        if checked_in is not None and time.monotonic() - checked_in >= idle_seconds:
            _ping(dbapi_connection)


async def database_answers(engine: AsyncEngine, within: float) -> None:
    """SELECT 1 on a connection of `engine` (the health probe's own); raises when the database
    does not answer `within` seconds (asyncpg's own connect and command timeouts come first;
    twice `within` is the backstop)."""
    async with asyncio.timeout(within * 2), engine.connect() as conn:
        await conn.execute(text(PRE_PING))
