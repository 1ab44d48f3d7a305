"""Server-side cursors for exports: batches pulled on demand, closed cleanly on cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy import Row, Select
from sqlalchemy.ext.asyncio import AsyncSession

Rows = Sequence[Row[*tuple[Any, ...]]]


async def partitions(
    session: AsyncSession, stmt: Select[*tuple[Any, ...]], batch_size: int
) -> AsyncIterator[Rows]:
    """The statement's rows, batch_size at a time, from a server-side cursor.

    A batch is fetched only when the consumer asks for the next one, so a slow client holds the
    cursor back instead of the server buffering the result. Each fetch runs shielded: a
    cancellation (client gone, deadline passed) that arrived mid-fetch would make SQLAlchemy
    throw the connection away, so instead the fetch in flight is allowed to finish (one batch),
    then the cursor is closed and the caller's transaction ends on a connection that goes back
    to the pool intact.
    """
    result = await session.stream(stmt.execution_options(yield_per=batch_size))
    try:
        while True:
            fetch = asyncio.ensure_future(result.fetchmany(batch_size))
            try:
                rows = await asyncio.shield(fetch)
            except asyncio.CancelledError:
                await asyncio.wait((fetch,))
                if not fetch.cancelled():
                    fetch.exception()  # retrieved: the cancellation is what goes up
                raise
            if not rows:
                return
            yield rows
    finally:
        await result.close()
