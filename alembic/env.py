"""Async Alembic environment: the models' metadata (with its naming convention), one
transaction per migration (so a migration can step out into an autocommit_block for
CONCURRENTLY or a batched backfill), the migration advisory lock, and lock/statement timeouts
(SHOP_MIGRATION_LOCK_TIMEOUT, SHOP_MIGRATION_STATEMENT_TIMEOUT) before any DDL.
docs/migrations.md says how to write a migration."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from service.config import Settings
from service.db.engine import create_unpooled_engine
from service.db.migration_safety import apply_timeouts, migration_lock, timeout_statements
from service.db.models import Base
from service.db.url import database_url

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
# Read here, not passed in: `alembic` on the command line and `python -m service migrate` both
# take the timeouts from the same SHOP_* variables.
settings = Settings()


@contextlib.contextmanager
def _url() -> Iterator[str]:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        yield url
    else:
        with database_url(settings) as resolved:
            yield resolved


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or "postgresql+asyncpg://",
        target_metadata=target_metadata,
        literal_binds=True,
        transaction_per_migration=True,
        dialect_opts={"paramstyle": "named"},
    )
    # The script carries the same timeouts as an online run, first thing, so whoever applies
    # it gets them too (and squawk sees them).
    for statement in timeout_statements(
        settings.migration_lock_timeout, settings.migration_statement_timeout
    ):
        context.execute(statement)
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    with migration_lock(connection):
        # Fail fast instead of queueing behind a long transaction (and blocking traffic behind
        # us). Session-level SETs, committed: they hold in every migration's transaction.
        apply_timeouts(
            connection, settings.migration_lock_timeout, settings.migration_statement_timeout
        )
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
