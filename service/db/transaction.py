"""Transaction scopes the doors of service/db/database.py open: committed, or read-only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker


@asynccontextmanager
async def transaction(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """Commit when the block ends normally, roll back on any exception, always close."""
    async with sessions() as session, session.begin():
        yield session


@asynccontextmanager
async def read_only_snapshot(
    sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """One REPEATABLE READ, READ ONLY transaction: a whole export sees one snapshot, so it never
    shows a row twice or misses one that existed throughout."""
    async with sessions() as session:
        await session.connection(
            execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
        )
        try:
            yield session
        finally:
            await session.rollback()


# An engine execution option: False where a single read must keep a transaction block (behind
# PgBouncer in transaction mode): Database._statement() reads it (the point reads).
AUTOCOMMIT_READS = "shop_autocommit_reads"
