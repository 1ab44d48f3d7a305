"""Engine and session factory, built from Settings."""

from __future__ import annotations

import os
import uuid
from typing import Any

from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import NullPool

import service.db.audit  # noqa: F401  (registers the audit listener)
from service.config import Settings
from service.db.closing import track_connections
from service.db.deadlines import bound_by_deadlines
from service.db.errors import discard_lost_connections
from service.db.ping import ping_on_checkout
from service.db.transaction import AUTOCOMMIT_READS


def create_engine(settings: Settings, url: str) -> AsyncEngine:
    """The serving engine: a pool (AsyncAdaptedQueuePool) sized by settings, pre-pinged, its
    transactions bounded by the calling RPC's deadline."""
    return _serving_engine(settings, url, settings.pool_size, settings.max_overflow, "shop-service")


def create_replica_engine(settings: Settings, url: str) -> AsyncEngine:
    """A read replica's engine: the serving engine's rules on a smaller pool, its connections
    named shop-service-replica/<pid> in pg_stat_activity, and a connect timeout of
    SHOP_HEALTH_TIMEOUT, so a replica that went silent since its last check costs a read that
    much before it falls back to the primary (service/db/database.py)."""
    size = settings.replica_pool_size
    return _serving_engine(
        settings, url, size, size, "shop-service-replica", timeout=settings.health_timeout
    )


def _serving_engine(
    settings: Settings,
    url: str,
    pool_size: int,
    max_overflow: int,
    name: str,
    timeout: float | None = None,
) -> AsyncEngine:
    args = connect_args(settings, name)
    if timeout is not None:
        args["timeout"] = timeout
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_recycle=settings.pool_recycle,
        pool_pre_ping=False,  # service/db/ping.py does it in one round trip
        echo=settings.debug,
        connect_args=args,
        execution_options={AUTOCOMMIT_READS: not settings.pgbouncer},
    )
    if settings.pool_pre_ping:
        ping_on_checkout(engine, settings.pool_pre_ping_idle)
    bound_by_deadlines(engine)
    discard_lost_connections(engine)  # after a failover, none to the old primary is reused
    track_connections(engine)  # so shutdown can end them if the database went silent
    return engine


def connect_args(settings: Settings, name: str = "shop-service") -> dict[str, Any]:
    """asyncpg.connect arguments for the serving engine."""
    # Names the process in pg_stat_activity: with SHOP_WORKERS > 1, which worker holds what.
    args: dict[str, Any] = {"server_settings": {"application_name": f"{name}/{os.getpid()}"}}
    if settings.pgbouncer:
        args.update(PGBOUNCER_CONNECT_ARGS)
    return args


# PgBouncer in transaction mode gives each transaction whichever server connection is free, so a
# statement prepared earlier may be missing there, or its name (asyncpg numbers them per client
# connection) already taken by another client's. So: no statement cache, neither SQLAlchemy's
# nor asyncpg's, and a unique name for each prepared statement (the SQLAlchemy asyncpg dialect
# docs, "Prepared Statement Name with PGBouncer"). Each statement is prepared and run inside one
# transaction, hence on one server connection.
PGBOUNCER_CONNECT_ARGS: dict[str, Any] = {
    "prepared_statement_cache_size": 0,
    "statement_cache_size": 0,
    "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4().hex}__",
}


def create_unpooled_engine(url: str) -> AsyncEngine:
    """NullPool: for one-off work (migrations, admin) whose connections must not be reused."""
    return create_async_engine(url, poolclass=NullPool)


def create_probe_engine(url: str, timeout: float) -> AsyncEngine:
    """For the health probe: a fresh connection per probe (NullPool), so a dropped connection
    cannot linger, and asyncpg's own connect and command timeouts so a hung server fails fast."""
    return create_async_engine(
        url, poolclass=NullPool, connect_args={"timeout": timeout, "command_timeout": timeout}
    )


def create_sessionmaker(
    engine: AsyncEngine, info: dict[str, Any] | None = None
) -> async_sessionmaker[AsyncSession]:
    """`info` is copied into every session (the server puts its SchemaFeatures there)."""
    # expire_on_commit=False: handlers read attributes after commit without a lazy load.
    return async_sessionmaker(engine, expire_on_commit=False, info=info)


def engine_of(sessions: async_sessionmaker[AsyncSession]) -> AsyncEngine:
    """The engine a sessionmaker binds its sessions to (for work below the session)."""
    engine = sessions.kw.get("bind")
    if not isinstance(engine, AsyncEngine):
        raise TypeError("the sessionmaker is not bound to an AsyncEngine")
    return engine
