"""Idempotency keys are kept for the retention period, then purged (and the id is free again)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.db.models import IdempotencyKey
from service.housekeeping import purge_idempotency_keys
from service.repositories.idempotency import IdempotencyRepository


async def _claim(sessions: async_sessionmaker[AsyncSession], request_id: str) -> bool:
    async with sessions() as session, session.begin():
        return await IdempotencyRepository(session).claim(request_id, b"hash") is None


async def test_purge_forgets_only_expired_keys(
    database_url: str, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    assert await _claim(sessions, "old")
    assert await _claim(sessions, "fresh")
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' "
                "WHERE request_id = 'old'"
            )
        )

    purged = await purge_idempotency_keys(database_url, timedelta(hours=24))

    assert purged == 1
    async with sessions() as session:
        left = (await session.scalars(select(IdempotencyKey.request_id))).all()
        assert left == ["fresh"]
        assert await session.scalar(select(func.count()).select_from(IdempotencyKey)) == 1
    assert await _claim(sessions, "old"), "a purged request_id can be used again"
    assert not await _claim(sessions, "fresh"), "a kept request_id is still remembered"
