"""Fixtures for fault tests: a PostgreSQL of our own that tests may stop and start, and clients
that record how each call ended."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.engine import create_unpooled_engine
from service.db.migrate import upgrade
from tests import tools
from tests.faults.own_postgres import OwnPostgres, own_postgres
from tests.postgres import fresh_database_on


@pytest.fixture(scope="session")
def own_pg() -> Iterator[OwnPostgres]:
    """This run's own PostgreSQL (not the shared one): the outage tests stop and start it."""
    tools.require(tools.POSTGRES_SERVER)
    with own_postgres() as server:
        yield server


@pytest.fixture
def own_pg_url(own_pg: OwnPostgres) -> Iterator[str]:
    """A fresh, migrated database on our own PostgreSQL, for one test."""
    if not own_pg.is_running():
        own_pg.start()
    with fresh_database_on(own_pg.url()) as url:
        upgrade(url)
        yield url


@pytest_asyncio.fixture
async def own_engine(own_pg_url: str) -> AsyncIterator[AsyncEngine]:
    """The test's own unpooled engine on that database, for checking what the server wrote."""
    engine = create_unpooled_engine(own_pg_url)
    yield engine
    await engine.dispose()
