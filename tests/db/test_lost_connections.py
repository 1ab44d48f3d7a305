"""What the engine does with a connection whose server went away or turned read-only, as after a
failover (docs/scale-out.md): the connection is discarded, not handed to the next call, and the
call's error reads as UNAVAILABLE (retry), never as a bug (INTERNAL)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from service import errors
from service.app.failures import as_domain_error
from service.config import Settings
from service.db.engine import create_engine, create_unpooled_engine
from service.db.errors import READ_ONLY_SQL_TRANSACTION, sqlstate
from tests.postgres import fresh_database_on


@pytest.fixture
def scratch_url(database_url: str) -> Iterator[str]:
    """A database of this test's own, so it may be made read-only."""
    with fresh_database_on(database_url) as url:
        yield url


@pytest_asyncio.fixture
async def one_connection(scratch_url: str) -> AsyncIterator[AsyncEngine]:
    """The serving engine on a pool of one: the next call gets whatever the last one left."""
    engine = create_engine(Settings(pool_size=1, max_overflow=0), scratch_url)
    yield engine
    await engine.dispose()


async def backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT pg_backend_pid()")) or 0)


async def test_a_pooled_connection_that_turned_read_only_is_discarded(
    one_connection: AsyncEngine,
) -> None:
    # A demoted primary answers 25006 on connections that stay open. The session setting
    # stands in for it: this connection, and only this one, refuses writes from now on.
    async with one_connection.begin() as conn:
        pid = await conn.scalar(text("SELECT pg_backend_pid()"))
        await conn.execute(text("SET SESSION default_transaction_read_only = on"))
    with pytest.raises(DBAPIError) as raised:
        async with one_connection.begin() as conn:
            await conn.execute(text("CREATE TABLE written (id int)"))
    assert sqlstate(raised.value) == READ_ONLY_SQL_TRANSACTION
    assert raised.value.connection_invalidated  # handle_error marked it a disconnect
    assert isinstance(as_domain_error(raised.value), errors.Unavailable)
    # The pool opened a new connection, which writes.
    assert await backend_pid(one_connection) not in (0, pid)
    async with one_connection.begin() as conn:
        await conn.execute(text("CREATE TABLE written (id int)"))


async def test_no_host_that_takes_writes_is_unavailable(scratch_url: str) -> None:
    # Every host of a target_session_attrs=read-write URL read-only, as in a failover before
    # the standby's promotion: asyncpg's TargetServerAttributeNotMatched.
    admin = create_unpooled_engine(scratch_url)
    name = make_url(scratch_url).database
    async with admin.begin() as conn:
        await conn.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
    await admin.dispose()
    # The same URL (TCP or a socket directory) asking for a host that takes writes.
    writable = make_url(scratch_url).update_query_dict({"target_session_attrs": "read-write"})
    engine = create_engine(
        Settings(pool_size=1, max_overflow=0), writable.render_as_string(hide_password=False)
    )
    try:
        with pytest.raises(DBAPIError) as raised:
            await backend_pid(engine)
    finally:
        await engine.dispose()
    assert isinstance(raised.value.orig.__cause__, asyncpg.TargetServerAttributeNotMatched)
    assert isinstance(as_domain_error(raised.value), errors.Unavailable)
