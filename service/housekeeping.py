"""Periodic clean-up, each run from cron or a Kubernetes CronJob:

- `python -m service purge-idempotency-keys`: idempotency keys are kept for
  SHOP_IDEMPOTENCY_RETENTION_HOURS (default 24, as Stripe does), long enough for any client's
  retries; after that a request_id may be used again.
- `python -m service prune-changes`: the change log is kept for SHOP_CHANGES_RETENTION (default 7
  days); a WatchChanges token older than that ends RESUME_TOKEN_EXPIRED."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from service.app.changes import prune
from service.db.database import Database
from service.db.engine import create_sessionmaker, create_unpooled_engine
from service.db.models import utcnow
from service.repositories.idempotency import IdempotencyRepository


async def prune_changes(url: str, retention: timedelta) -> int:
    """Delete the change log's entries older than `retention`, in batches, through the write
    door."""
    engine = create_unpooled_engine(url)
    try:
        return await prune(Database(engine, create_sessionmaker(engine)), retention)
    finally:
        await engine.dispose()


async def purge_idempotency_keys(url: str, retention: timedelta) -> int:
    """Delete the keys older than `retention`, through the write door like any other write."""
    engine = create_unpooled_engine(url)
    cutoff = utcnow() - retention

    async def purge(session: AsyncSession) -> int:
        return await IdempotencyRepository(session).purge(cutoff)

    try:
        return await Database(engine, create_sessionmaker(engine)).write(purge)
    finally:
        await engine.dispose()
