"""Engine and session factory, built from Settings."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import NullPool

import service.db.audit  # noqa: F401  (registers the audit listener)
from service.config import Settings


def create_engine(settings: Settings, url: str) -> AsyncEngine:
    """The serving engine: a pool (AsyncAdaptedQueuePool) sized by settings, pre-pinged."""
    return create_async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_recycle=settings.pool_recycle,
        pool_pre_ping=settings.pool_pre_ping,
        echo=settings.debug,
    )


def create_unpooled_engine(url: str) -> AsyncEngine:
    """NullPool: for one-off work (migrations, admin) whose connections must not be reused."""
    return create_async_engine(url, poolclass=NullPool)


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: handlers read attributes after commit without a lazy load.
    return async_sessionmaker(engine, expire_on_commit=False)
