"""Work on a pooled connection's asyncpg driver, below SQLAlchemy's execution layer.

For the hottest unary paths: GetUser's one indexed read and Transfer's few statements. Through
an AsyncSession each statement paid for a greenlet hop and an execution context, and each call
for a Session, its SessionTransaction and a Connection: about a third of GetUser's server CPU
and most of Transfer's (docs/benchmark-profiles.md). Here SQLAlchemy still owns the pool (its
size, timeout, pre-ping and recycling) and compiles each statement once; the driver runs them
from its own prepared-statement cache.

What SQLAlchemy's execution layer did on failure is done here too: a connection that broke is
invalidated, not handed to the next caller; a statement cut off by a cancellation is
cancelled server-side and its transaction rolled back before the connection goes back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.deadlines import milliseconds_left
from service.db.streaming import shielded
from service.db.transaction import AUTOCOMMIT_READS
from service.errors import Unavailable


@asynccontextmanager
async def checked_out(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """A connection from the engine's pool, as its asyncpg connection; back to the pool at the
    end, or discarded if it broke or was left inside a transaction."""
    fairy = await engine.raw_connection()
    driver = fairy.driver_connection
    assert driver is not None  # a connection checked out of the pool is open
    try:
        yield driver
    except BaseException as exc:
        if isinstance(exc, _BROKEN) or driver.is_closed() or driver.is_in_transaction():
            fairy.invalidate(exc if isinstance(exc, Exception) else None)
        if driver.is_closed() and isinstance(exc, Exception):
            # The server went away under the statement (asyncpg says "connection is closed",
            # with no SQLSTATE): the client may retry, as for any outage.
            raise Unavailable.database_down() from exc
        raise
    finally:
        fairy.close()


@asynccontextmanager
async def single_statement(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection's asyncpg connection for one read statement, run in autocommit (the
    statement is its own transaction: no BEGIN and COMMIT round trips). Behind pgbouncer in
    transaction mode (the engine's AUTOCOMMIT_READS is off) it runs in a read-only transaction
    instead, so its prepare and execute reach the same server connection."""
    async with checked_out(engine) as driver:
        if engine.get_execution_options().get(AUTOCOMMIT_READS, True):
            yield driver
        else:
            async with _block(driver, readonly=True):
                yield driver


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """A unit of work on a pooled connection's driver: BEGIN, the calling RPC's deadline as
    statement_timeout (service/db/deadlines.py), COMMIT when the block ends normally and
    ROLLBACK when it raises (see _block for cancellations)."""
    async with checked_out(engine) as driver, _block(driver):
        timeout_ms = milliseconds_left()
        if timeout_ms is not None:
            # An int, not a bound parameter: SET takes no parameters.
            await driver.execute(f"SET LOCAL statement_timeout = {timeout_ms}")
        yield driver


@asynccontextmanager
async def _block(driver: asyncpg.Connection, *, readonly: bool = False) -> AsyncIterator[None]:
    """A transaction block that never leaves its connection inside a transaction.

    A cancellation (the client went away) mid-statement makes asyncpg send PostgreSQL a cancel
    request for it; the ROLLBACK, shielded from the cancellation, waits for that to land, so
    a statement stuck on a lock stops at once instead of holding its locks until it gets them.
    When there is no clean way back (BEGIN or COMMIT itself cut off, the ROLLBACK failing),
    the connection is closed: checked_out() discards it, and PostgreSQL rolls back whatever
    the transaction did as the connection goes."""
    tx = driver.transaction(readonly=readonly)
    ended = False  # committed or rolled back, as far as asyncpg and PostgreSQL both know
    try:
        await tx.start()
        try:
            yield
        except BaseException as exc:
            if not isinstance(exc, _BROKEN) and not driver.is_closed():
                await shielded(tx.rollback())
                ended = True
            raise
        await tx.commit()
        ended = True
    except BaseException as exc:
        if not ended and not isinstance(exc, _BROKEN):
            driver.terminate()  # a broken connection is checked_out()'s to discard
        raise


# Errors after which the connection's protocol state is unknown. An error the server answered
# with (a constraint, a statement_timeout) leaves the connection usable, as do the caller's own
# exceptions raised inside the block and a cancellation (asyncpg cancels the statement in
# flight server-side, and the connection's next statement waits until that is done).
_BROKEN = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
