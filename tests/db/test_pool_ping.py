"""The pool's pre-ping: a connection that sat idle is checked before use and replaced if its
server side is gone; one handed back moments ago is used without the extra round trip."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import Settings
from service.db.engine import create_engine

IDLE = 0.3


@pytest_asyncio.fixture
async def pinged_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    settings = Settings(pool_size=1, max_overflow=0, pool_pre_ping_idle=IDLE)
    engine = create_engine(settings, database_url)
    yield engine
    await engine.dispose()


async def backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT pg_backend_pid()")) or 0)


async def terminate(engine: AsyncEngine, pid: int) -> None:
    async with engine.connect() as conn:
        # wait: true once the backend has exited, so the dead connection is there to meet.
        await conn.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})


async def test_idle_connection_whose_backend_died_is_replaced(
    pinged_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    pid = await backend_pid(pinged_engine)
    await terminate(engine, pid)
    await asyncio.sleep(IDLE * 1.5)
    # The ping finds the dead connection; the pool opens another and the statement succeeds.
    assert await backend_pid(pinged_engine) not in (0, pid)


async def test_connection_just_checked_in_is_not_pinged(
    pinged_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    pid = await backend_pid(pinged_engine)
    await terminate(engine, pid)
    # Not idle long enough to be pinged: the statement itself meets the dead connection...
    with pytest.raises(DBAPIError) as raised:
        await backend_pid(pinged_engine)
    assert raised.value.connection_invalidated
    # ...and the pool has replaced it for the next checkout.
    assert await backend_pid(pinged_engine) not in (0, pid)
