"""Server-side cursors for exports: SQLAlchemy streaming results, batches pulled on demand,
closed cleanly on cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Sequence
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Row,
    Select,
    TextClause,
    cast,
    extract,
    literal_column,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import QueryableAttribute

T = TypeVar("T")

# A batch of an export: SQLAlchemy rows of the columns the statement selects, which unpack as
# tuples and read a column by name (row.id).
Rows = Sequence[Row[*tuple[Any, ...]]]


async def shielded(fetch: Awaitable[T]) -> T:
    """Await a fetch that a cancellation (client gone, deadline passed) lets finish.

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
    source: AsyncSession | AsyncConnection,
    stmt: Select[*tuple[Any, ...]] | TextClause,
    batch_size: int,
) -> AsyncGenerator[Rows, None]:
    """The statement's rows, batch_size at a time, from a server-side cursor in the session's
    transaction: SQLAlchemy's streaming (stream_results with yield_per) on the session's
    connection, so the export reads the caller's snapshot.

    The session's connection, not session.stream(): the same transaction, without the ORM's
    execution layer, which adds nothing to a select of columns and cost ~2 µs more per row
    (500k users, fetch only: 2.7 µs/row on the connection, 4.7-6.4 through the session).

    A batch is fetched only when the consumer asks for the next one, so a slow client holds the
    cursor back instead of the server buffering the result. The partitions are result.fetchmany
    (what AsyncResult.partitions() awaits) run one by one under shielded(): a cancellation that
    arrives mid-fetch lets the fetch in flight (one batch) finish; the result is then closed,
    the caller's transaction ends, closing the cursor, and the connection goes back to the pool
    intact.
    """
    connection = source if isinstance(source, AsyncConnection) else await source.connection()
    # Not shielded: opening the cursor parses the statement, which waits for the tables' locks;
    # a shutdown or a deadline must be able to cut that wait short (SQLAlchemy then discards
    # the connection, interrupted mid-command). Only the fetches of rows run shielded.
    result = await connection.stream(stmt.execution_options(yield_per=batch_size))
    try:
        while rows := await shielded(result.fetchmany(batch_size)):
            yield rows
    finally:
        await result.close()
