"""Shared fixtures: one real PostgreSQL and one real gRPC server per run, clean tables per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from shop.v1 import account_service_pb2_grpc, order_service_pb2_grpc, user_service_pb2_grpc
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.config import Settings
from service.db.engine import create_sessionmaker, create_unpooled_engine
from service.db.migrate import upgrade
from service.db.models import Base
from service.serving.server import RunningServer, start_server
from tests import postgres
from tests.factories import Factory
from tests.postgres import test_database

pytest_plugins = ["tests.rpc", "tests.tools"]


def pytest_report_header(config: pytest.Config) -> str:
    return f"database: {postgres.describe(postgres.chosen())} (tests/postgres.py)"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in postgres.USED:
        terminalreporter.write_line(f"database used: {line}")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with test_database() as url:
        upgrade(url)
        yield url


@pytest_asyncio.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The tests' own engine, for arranging data and checking what the server wrote."""
    engine = create_unpooled_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_sessionmaker(engine)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(grpc_host="127.0.0.1", grpc_port=0, pool_size=20, max_overflow=10)


@pytest_asyncio.fixture(scope="session")
async def server(settings: Settings, database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(settings, database_url)
    yield running
    await running.stop(grace=None)


@pytest_asyncio.fixture(scope="session")
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def user_stub(channel: grpc.aio.Channel) -> user_service_pb2_grpc.UserServiceStub:
    return user_service_pb2_grpc.UserServiceStub(channel)


@pytest.fixture(scope="session")
def order_stub(channel: grpc.aio.Channel) -> order_service_pb2_grpc.OrderServiceStub:
    return order_service_pb2_grpc.OrderServiceStub(channel)


@pytest.fixture(scope="session")
def account_stub(channel: grpc.aio.Channel) -> account_service_pb2_grpc.AccountServiceStub:
    return account_service_pb2_grpc.AccountServiceStub(channel)


@pytest_asyncio.fixture(autouse=True)
async def _clean_tables(engine: AsyncEngine) -> AsyncIterator[None]:
    """Each test leaves empty tables (the server commits for real, so no rollback trick).
    tests/unit overrides this fixture: its tests touch no database."""
    yield
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture
def factory(sessions: async_sessionmaker[AsyncSession]) -> Factory:
    return Factory(sessions)


class StatementCounter:
    """Counts SQL statements the server's engine runs (for N+1 checks)."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.statements.append(statement)

    @property
    def count(self) -> int:
        return len(self.statements)


@pytest.fixture
def statements(server: RunningServer) -> Iterator[StatementCounter]:
    counter = StatementCounter()
    event.listen(server.engine.sync_engine, "before_cursor_execute", counter)
    yield counter
    event.remove(server.engine.sync_engine, "before_cursor_execute", counter)
