"""Closing the serving pool at shutdown within a bound.

`engine.dispose()` closes each pooled connection gracefully: asyncpg sends Terminate and waits,
with no timeout, for the server to hang up. A database host gone silent (packets dropped,
nothing refused) never hangs up, so the close waits as long as TCP retransmits — minutes. Past
the bound, every connection of the engine still open is terminated (its socket aborted); the
stuck close then returns at once and the ones after it find their connection already closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from weakref import WeakKeyDictionary, WeakSet

from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

# Per engine, the driver (asyncpg) connections it opened; weak, so closed ones drop out.
_opened: WeakKeyDictionary[Engine, WeakSet[Any]] = WeakKeyDictionary()

# After terminating: time for the stuck close to see its socket gone (one loop turn or two).
_AFTER_TERMINATE_SECONDS = 1.0


def track_connections(engine: AsyncEngine) -> None:
    """Remember each driver connection the engine opens, so `dispose_within` can end them."""
    opened: WeakSet[Any] = WeakSet()
    _opened[engine.sync_engine] = opened

    def connected(_dbapi_connection: Any, record: Any) -> None:
        opened.add(record.driver_connection)

    event.listen(engine.sync_engine, "connect", connected)


async def dispose_within(engine: AsyncEngine, seconds: float) -> bool:
    """engine.dispose(), given `seconds`; then its connections are terminated. Returns whether
    the pool closed gracefully. Connections checked out are not the pool's to close."""
    disposing = asyncio.ensure_future(engine.dispose())
    done, _ = await asyncio.wait((disposing,), timeout=seconds)
    if done:
        disposing.result()
        return True
    # All of them: the one stuck in its close already counts as closed (is_closed()).
    opened = list(_opened.get(engine.sync_engine, ()))
    log.warning(
        "database pool not closed after %.1fs (database not answering?): "
        "terminating its connections",
        seconds,
    )
    for connection in opened:
        connection.terminate()  # aborts the socket; a no-op on one already closed
    done, _ = await asyncio.wait((disposing,), timeout=_AFTER_TERMINATE_SECONDS)
    if not done:
        disposing.cancel()
        await asyncio.wait((disposing,))
    if not disposing.cancelled() and disposing.exception() is not None:
        log.warning("closing the terminated pool: %s", type(disposing.exception()).__name__)
    return False
