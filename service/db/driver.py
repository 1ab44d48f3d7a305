"""One read statement on a pooled connection's asyncpg driver, below SQLAlchemy's execution layer.

GetUser's whole unit of work is one indexed read. Through an AsyncSession it paid, per call,
for a Session and its SessionTransaction, a Connection, a greenlet hop per await and an
execution context, about a third of the server's CPU per call (docs/benchmark-profiles.md).
Here SQLAlchemy still owns the pool (its size, timeout, pre-ping and recycling) and compiles
the statement once; the driver runs it from its own prepared-statement cache.

What SQLAlchemy's execution layer did on failure is done here too: a connection whose
statement was interrupted (cancelled by the client or the deadline) or that lost its server is
invalidated, not handed to the next caller mid-protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import Select
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.streaming import Row
from service.db.transaction import AUTOCOMMIT_READS


@dataclass(frozen=True, slots=True)
class Statement:
    """A select compiled once for asyncpg: its SQL with $n placeholders and the bound names in
    placeholder order."""

    sql: str
    names: tuple[str, ...]

    @classmethod
    def compile(cls, stmt: Select[*tuple[Any, ...]]) -> Statement:
        compiled = stmt.compile(dialect=asyncpg_dialect())  # type: ignore[no-untyped-call]
        return cls(str(compiled), tuple(compiled.positiontup or ()))

    async def fetchrow(self, driver: asyncpg.Connection, **params: Any) -> Row | None:
        row: Row | None = await driver.fetchrow(
            self.sql, *(params[n] for n in self.names), record_class=Row
        )
        return row

    async def fetch(self, driver: asyncpg.Connection, **params: Any) -> list[Row]:
        rows: list[Row] = await driver.fetch(
            self.sql, *(params[n] for n in self.names), record_class=Row
        )
        return rows


@asynccontextmanager
async def single_statement(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection's asyncpg connection for one read statement, run in autocommit (the
    statement is its own transaction: no BEGIN and COMMIT round trips). Behind pgbouncer in
    transaction mode (the engine's AUTOCOMMIT_READS is off) it runs in a read-only transaction
    instead, so its prepare and execute reach the same server connection."""
    fairy = await engine.raw_connection()
    driver = fairy.driver_connection
    assert driver is not None  # a connection checked out of the pool is open
    try:
        if engine.get_execution_options().get(AUTOCOMMIT_READS, True):
            yield driver
        else:
            async with driver.transaction(readonly=True):
                yield driver
    except BaseException as exc:
        if isinstance(exc, _INTERRUPTED) or driver.is_closed():
            # Cancelled mid-statement, or the connection broke: never hand it out again.
            fairy.invalidate(exc if isinstance(exc, Exception) else None)
        raise
    finally:
        fairy.close()


# Errors after which the connection's protocol state is unknown. An error the server answered
# with (a constraint, a statement_timeout) leaves the connection usable, as do the caller's own
# exceptions raised inside the block.
_INTERRUPTED = (
    asyncio.CancelledError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
