"""Periodic clean-up: idempotency keys are kept for SHOP_IDEMPOTENCY_RETENTION_HOURS (default
24, as Stripe does), long enough for any client's retries; after that a request_id may be
used again. Run `python -m service purge-idempotency-keys` from cron or a Kubernetes CronJob."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from service.db.database import Database
from service.db.engine import create_sessionmaker, create_unpooled_engine
from service.db.models import utcnow
from service.repositories.idempotency import IdempotencyRepository


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
