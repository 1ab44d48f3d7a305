"""Fixtures for the multi-host tests: three namespaces on one bridge, a PostgreSQL of their own
listening on the bridge, one replica per namespace, Envoy on the host in front of them, and the
data the load works on. Everything is torn down at the end, failures included."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.db.engine import create_sessionmaker, create_unpooled_engine
from service.db.migrate import upgrade
from service.db.models import User
from tests.factories import Factory
from tests.faults.own_postgres import OwnPostgres, own_postgres
from tests.multihost.cluster import Envoy, Replica, envoy_in_front
from tests.multihost.hosts import Network, network

USERS = 40_000  # an export of ~3 MB: ~11 s for a slow reader, longer than a restart
ACCOUNTS = 12
START_BALANCE = "1000000.00"


@pytest.fixture
def _clean_tables() -> Iterator[None]:
    """Overrides the suite's: these tests run on a PostgreSQL of their own, dropped after."""
    yield


@pytest.fixture
def net() -> Iterator[Network]:
    with network(3) as built:
        yield built


@pytest.fixture
def pg(net: Network) -> Iterator[OwnPostgres]:
    with own_postgres(also_listen=(net.gateway,), trusted=(net.subnet,)) as server:
        yield server


@pytest.fixture
def database_url_here(pg: OwnPostgres) -> str:
    """The migrated database as the test reaches it (127.0.0.1)."""
    url = pg.url()
    upgrade(url)
    return url


@pytest_asyncio.fixture
async def db(database_url_here: str) -> AsyncIterator[AsyncEngine]:
    engine = create_unpooled_engine(database_url_here)
    yield engine
    await engine.dispose()


@dataclass
class Seed:
    user_ids: list[int]
    account_ids: list[int]
    sessions: async_sessionmaker[AsyncSession]


@pytest_asyncio.fixture
async def seed(db: AsyncEngine) -> Seed:
    """USERS users for GetUser and the export; ACCOUNTS rich accounts to move money between."""
    rows = [
        {"email": f"mh{n}@example.com", "first_name": "Ada", "last_name": f"Host{n}"}
        for n in range(USERS)
    ]
    async with db.begin() as conn:
        await conn.execute(insert(User), rows)
    sessions = create_sessionmaker(db)
    factory = Factory(sessions)
    accounts = [await factory.account(balance=START_BALANCE) for _ in range(ACCOUNTS)]
    async with db.connect() as conn:  # the accounts' owners are users too
        user_ids = list((await conn.scalars(select(User.id).order_by(User.id))).all())
    return Seed(user_ids, [a.id for a in accounts], sessions)


@pytest.fixture
def replicas(net: Network, database_url_here: str, tmp_path: Path) -> Iterator[list[Replica]]:
    """One serving replica per namespace, reaching PostgreSQL at the bridge's address."""
    url = make_url(database_url_here).set(host=net.gateway).render_as_string(hide_password=False)
    started = [Replica(host, url, tmp_path) for host in net.hosts]
    try:
        for replica in started:
            replica.start()
        for replica in started:
            replica.wait_serving()
        yield started
    finally:
        for replica in started:
            replica.kill()


@pytest.fixture
def envoy(replicas: list[Replica], tmp_path: Path) -> Iterator[Envoy]:
    with envoy_in_front(replicas, tmp_path) as front:
        yield front
