"""Fixtures for the read-replica tests: a PostgreSQL of their own with a real streaming replica
(tests/replicas/standby.py), a fresh migrated database per test, and a real server process
reading from the replica."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from subprocess import SubprocessError

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url

from service.db.migrate import upgrade
from tests import tools
from tests.faults.own_postgres import OwnPostgres, own_postgres
from tests.postgres import fresh_database_on
from tests.process import Served, served_process
from tests.replicas.standby import start_standby

# Short, so the tests that wait for a replica to be skipped (or used again) wait little.
MAX_LAG = 0.5
CHECK_INTERVAL = 0.2


@pytest.fixture
def _clean_tables() -> Iterator[None]:
    """Overrides the suite's: these tests run on a PostgreSQL of their own, dropped after."""
    yield


@dataclass
class Pair:
    primary: OwnPostgres
    standby: OwnPostgres


@pytest.fixture(scope="session")
def pair() -> Iterator[Pair]:
    """A primary of the tests' own and its hot standby, for the whole run."""
    tools.require(tools.POSTGRES_SERVER)
    pg_basebackup = tools.require(tools.PG_BASEBACKUP)
    with own_postgres() as primary, tempfile.TemporaryDirectory(prefix="shop-standby-") as tmp:
        standby = start_standby(primary, Path(tmp), pg_basebackup)
        try:
            yield Pair(primary, standby)
        finally:
            if standby.is_running():
                with suppress(SubprocessError):
                    standby.stop("immediate")


def dsn(url: str) -> str:
    """The SQLAlchemy URL as asyncpg takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Databases:
    """One test's database: its URL on the primary, and the same database on the standby."""

    primary_url: str
    replica_url: str

    async def primary(self) -> asyncpg.Connection:
        return await asyncpg.connect(dsn(self.primary_url))

    async def replica(self) -> asyncpg.Connection:
        return await asyncpg.connect(dsn(self.replica_url))

    async def replica_caught_up(self, within: float = 10.0) -> None:
        """Until the standby has replayed everything the primary has written so far."""
        primary = await self.primary()
        try:
            target = await primary.fetchval("SELECT pg_current_wal_lsn()")  # an int
        finally:
            await primary.close()
        deadline = time.monotonic() + within
        while True:
            replayed = None
            # A standby starting up, or one yet to replay the CREATE DATABASE.
            with suppress(OSError, asyncpg.CannotConnectNowError, asyncpg.InvalidCatalogNameError):
                replica = await self.replica()
                try:
                    replayed = await replica.fetchval("SELECT pg_last_wal_replay_lsn()")
                finally:
                    await replica.close()
            if replayed is not None and replayed >= target:
                return
            assert time.monotonic() < deadline, "the standby did not catch up"
            await asyncio.sleep(0.05)


@pytest.fixture
def databases(pair: Pair) -> Iterator[Databases]:
    """A fresh migrated database on the primary (the standby replays its creation)."""
    for server in (pair.primary, pair.standby):
        if not server.is_running():
            server.start()
    with fresh_database_on(pair.primary.url()) as url:
        upgrade(url)
        name = make_url(url).database
        assert name is not None
        yield Databases(url, pair.standby.url(name))


@pytest_asyncio.fixture
async def served(databases: Databases, tmp_path: Path) -> AsyncIterator[Served]:
    """`python -m service serve` on the primary, with the standby as its read replica."""
    await databases.replica_caught_up()
    log = tmp_path / "serve.log"
    env = {
        "SHOP_DATABASE_REPLICA_URLS": databases.replica_url,
        "SHOP_REPLICA_MAX_LAG": str(MAX_LAG),
        "SHOP_REPLICA_CHECK_INTERVAL": str(CHECK_INTERVAL),
        "SHOP_HEALTH_INTERVAL": "0.2",
    }
    async with served_process(databases.primary_url, log, **env) as served:
        yield served
