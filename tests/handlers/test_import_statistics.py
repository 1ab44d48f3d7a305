"""ImportUsers leaves the users statistics fresh after a large import (ANALYZE in its
transaction), and spares a small one the ANALYZE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.repositories.users import UserRepository
from tests.streams.helpers import eventually, insert_users

Stub = user_service_pb2_grpc.UserServiceStub
LARGE = UserRepository.ANALYZE_MIN_ROWS + 500


async def requests(count: int, *, per_message: int = 500) -> AsyncIterator[api.ImportUsersRequest]:
    for start in range(0, count, per_message):
        yield api.ImportUsersRequest(
            users=[
                api.UpsertUser(email=f"imp{i}@example.com", first_name="Imp", last_name=f"N{i}")
                for i in range(start, min(start + per_message, count))
            ]
        )


async def statistics(engine: AsyncEngine) -> dict[str, Any]:
    """users' row estimate and manual ANALYZE count, read on a fresh connection (a transaction
    would keep reading the statistics snapshot it took first)."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT c.reltuples, s.analyze_count, "
                    "(SELECT count(*) FROM pg_stats WHERE tablename = 'users') AS columns "
                    "FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid "
                    "WHERE c.oid = 'users'::regclass"
                )
            )
        ).one()
        return dict(row._mapping)


async def test_a_large_import_leaves_the_statistics_counting_its_rows(
    user_stub: Stub, engine: AsyncEngine
) -> None:
    before = await statistics(engine)
    assert before["reltuples"] <= 0  # a truncated table: never analyzed since

    reply = await user_stub.ImportUsers(requests(LARGE))

    assert reply.imported == LARGE
    after = await statistics(engine)
    # ANALYZE ran in the import's transaction and counted that transaction's own rows.
    assert after["reltuples"] == LARGE
    assert after["columns"] > 0  # pg_statistic committed with the import
    assert await eventually(lambda: _analyzed_since(engine, before["analyze_count"]))


async def _analyzed_since(engine: AsyncEngine, count: int) -> bool:
    return bool((await statistics(engine))["analyze_count"] > count)


async def test_a_small_import_does_not_analyze(user_stub: Stub, engine: AsyncEngine) -> None:
    await insert_users(engine, 50)
    async with engine.connect() as conn:
        await conn.execute(text("ANALYZE users"))
        await conn.commit()
    before = await statistics(engine)
    assert before["reltuples"] == 50

    reply = await user_stub.ImportUsers(requests(3))

    assert reply.imported == 3
    after = await statistics(engine)
    assert after["reltuples"] == 50
    assert after["analyze_count"] == before["analyze_count"]


async def test_an_import_small_beside_the_table_does_not_analyze(
    user_stub: Stub, engine: AsyncEngine
) -> None:
    """Past the floor but under a tenth of the rows the statistics already count."""
    table = 20 * UserRepository.ANALYZE_MIN_ROWS
    await insert_users(engine, table)
    async with engine.connect() as conn:
        await conn.execute(text("ANALYZE users"))
        await conn.commit()
    before = await statistics(engine)

    reply = await user_stub.ImportUsers(requests(UserRepository.ANALYZE_MIN_ROWS + 100))

    assert reply.imported == UserRepository.ANALYZE_MIN_ROWS + 100
    after = await statistics(engine)
    assert after["reltuples"] == before["reltuples"] == table
    assert after["analyze_count"] == before["analyze_count"]


async def test_an_import_goes_ahead_when_analyze_cannot_have_its_lock(
    user_stub: Stub, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """Someone holds a lock ANALYZE conflicts with: the import commits without it."""
    async with sessions() as holder, holder.begin():
        await holder.execute(text("LOCK TABLE users IN SHARE UPDATE EXCLUSIVE MODE"))
        reply = await user_stub.ImportUsers(requests(LARGE))
    assert reply.imported == LARGE
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM users")) == LARGE
    assert (await statistics(engine))["reltuples"] <= 0


@pytest_asyncio.fixture(autouse=True)
async def _no_autoanalyze(engine: AsyncEngine) -> AsyncIterator[None]:
    """Autovacuum may analyze users on its own after an import (its threshold is 50 rows plus a
    tenth of the table) and move reltuples under an assertion: not on this table, meanwhile."""
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE users SET (autovacuum_enabled = off)"))
    yield
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE users RESET (autovacuum_enabled)"))
