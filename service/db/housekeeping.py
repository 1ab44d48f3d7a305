"""Periodic clean-up: idempotency keys are kept for SHOP_IDEMPOTENCY_RETENTION_HOURS (default
24, as Stripe does), long enough for any client's retries; after that a request_id may be
used again. Run `python -m service purge-idempotency-keys` from cron or a Kubernetes CronJob."""

from __future__ import annotations

from datetime import timedelta

from service.db.engine import create_sessionmaker, create_unpooled_engine
from service.db.models import utcnow
from service.db.transaction import transaction
from service.repositories.idempotency import IdempotencyRepository


async def purge_idempotency_keys(url: str, retention: timedelta) -> int:
    engine = create_unpooled_engine(url)
    try:
        async with transaction(create_sessionmaker(engine)) as session:
            return await IdempotencyRepository(session).purge(utcnow() - retention)
    finally:
        await engine.dispose()
