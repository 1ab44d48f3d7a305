"""Async Alembic environment: the models' metadata (with its naming convention), one
transaction per migration, and lock/statement timeouts before any DDL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from logging.config import fileConfig

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from service.config import Settings
from service.db.database import database_url
from service.db.engine import create_unpooled_engine
from service.db.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
LOCK_TIMEOUT = "5s"
STATEMENT_TIMEOUT = "60s"


@contextlib.contextmanager
def _url() -> Iterator[str]:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        yield url
    else:
        with database_url(Settings()) as resolved:
            yield resolved


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or "postgresql+asyncpg://",
        target_metadata=target_metadata,
        literal_binds=True,
        transaction_per_migration=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    # Fail fast instead of queueing behind a long transaction (and blocking traffic behind us).
    connection.execute(text(f"SET lock_timeout = '{LOCK_TIMEOUT}'"))
    connection.execute(text(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'"))
    connection.commit()
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        transaction_per_migration=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    with _url() as url:
        engine = create_unpooled_engine(url)
        try:
            async with engine.connect() as connection:
                await connection.run_sync(_run)
        finally:
            await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
