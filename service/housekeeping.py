"""Periodic clean-up, each run from cron or a Kubernetes CronJob:

- `python -m service purge-idempotency-keys`: idempotency keys are kept for
  SHOP_IDEMPOTENCY_RETENTION_HOURS (default 24, as Stripe does), long enough for any client's
  retries; after that a request_id may be used again.
- `python -m service prune-changes`: the change log is kept for SHOP_CHANGES_RETENTION (default 7
  days); a WatchChanges token older than that ends RESUME_TOKEN_EXPIRED."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from service.app.changes import prune
from service.db.database import Database
from service.db.engine import create_sessionmaker, create_unpooled_engine
from service.db.models import utcnow
from service.repositories.idempotency import IdempotencyRepository


@asynccontextmanager
async def _database(url: str) -> AsyncIterator[Database]:
    """A Database for one clean-up run, on connections of its own, closed afterwards."""
    engine = create_unpooled_engine(url)
    try:
        yield Database(engine, create_sessionmaker(engine))
    finally:
        await engine.dispose()


async def prune_changes(url: str, retention: timedelta) -> int:
    """Delete the change log's entries older than `retention`, in batches, through the write
    door."""
    async with _database(url) as db:
        return await prune(db, retention)


async def purge_idempotency_keys(url: str, retention: timedelta) -> int:
    """Delete the keys older than `retention`, through the write door like any other write."""
    cutoff = utcnow() - retention

    async def purge(session: AsyncSession) -> int:
        return await IdempotencyRepository(session).purge(cutoff)

    async with _database(url) as db:
        return await db.write(purge)
