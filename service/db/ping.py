"""SHOP_POOL_PRE_PING in one round trip.

SQLAlchemy's own pre-ping for asyncpg wraps its ping in BEGIN ... ROLLBACK: three round trips on
every checkout, more than a GetUser itself. This one sends one simple query (no prepared
statement, so it is safe behind pgbouncer too) and, when it fails, lets the pool replace the
connection as pre-ping does.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_


def _ping(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    try:
        # Simple query protocol: no prepared statement. (asyncpg fails on an empty query.)
        await_(dbapi_connection.driver_connection.execute("SELECT 1"))
    except Exception as exc:
        # DisconnectionError: the pool discards this connection and checks out another.
        raise DisconnectionError("pre-ping failed") from exc


def ping_on_checkout(engine: AsyncEngine) -> None:
    """Check every connection as it leaves the pool (instead of create_engine's pool_pre_ping)."""
    event.listen(engine.sync_engine.pool, "checkout", _ping)
