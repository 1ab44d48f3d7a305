"""Server-side cursors for exports: batches pulled on demand, closed cleanly on cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from sqlalchemy import BigInteger, ColumnElement, Select, cast, extract, literal_column
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import QueryableAttribute

from service.db.raw import Row, Rows, Statement, driver_of

T = TypeVar("T")


async def shielded(fetch: Awaitable[T]) -> T:
    """Await a driver fetch that a cancellation (client gone, deadline passed) lets finish.

    A fetch cut off mid-message would leave the connection's protocol state unknown and cost
    the connection; let to finish, it costs at most the batch in flight. The cancellation then
    goes up as usual: the caller's transaction ends, closing any cursor, and the connection goes
    back to the pool intact.
    """
    task = asyncio.ensure_future(fetch)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait((task,))
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what goes up
        raise


def epoch_microseconds(
    column: ColumnElement[Any] | QueryableAttribute[Any],
) -> ColumnElement[int]:
    """A timestamptz as integer microseconds since the Unix epoch, computed by PostgreSQL (exact:
    EXTRACT returns numeric since PostgreSQL 14). An int8 costs asyncpg far less to decode than
    a datetime, and a converter turns it into a Timestamp with one divmod."""
    return cast(extract("epoch", column) * literal_column("1000000"), BigInteger)


async def partitions(
    session: AsyncSession, stmt: Select[*tuple[Any, ...]], batch_size: int
) -> AsyncIterator[Rows]:
    """The statement's rows, batch_size at a time, from a server-side cursor in the session's
    transaction.

    The hot path of every export, so the rows come straight from asyncpg's cursor: SQLAlchemy
    compiles the statement and owns the transaction, but its result layer (a Row built per
    record, a row buffer, two fetches per batch) cost more per row than asyncpg's decoding
    (docs/benchmarks.md). Bound values go to the driver as they are (ints, strings, booleans:
    no SQLAlchemy type processing).

    A batch is fetched only when the consumer asks for the next one, so a slow client holds the
    cursor back instead of the server buffering the result. Each fetch runs shielded(): a
    cancellation that arrives mid-fetch lets the fetch in flight (one batch) finish; the
    caller's transaction then ends, closing the cursor, and the connection goes back to the
    pool intact.
    """
    statement = Statement.compile(stmt)
    driver = await driver_of(session)
    if not driver.is_in_transaction():
        # SQLAlchemy's adapter sends BEGIN (with the session's isolation level and READ ONLY)
        # just before its first statement, and a cursor lives only inside a transaction.
        await (await session.connection()).exec_driver_sql("SELECT 1")
    cursor = await driver.cursor(statement.sql, *statement.args({}), record_class=Row)
    while True:
        rows: list[Row] = await shielded(cursor.fetch(batch_size))
        if not rows:
            return
        yield rows
