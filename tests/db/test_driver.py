"""Units of work on the pooled connection's driver (service/db/driver.py): commit, rollback,
retries of raw asyncpg errors, and a connection interrupted mid-statement never reused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import Settings
from service.db.driver import transaction
from service.db.engine import create_engine
from service.db.retry import DEADLOCK_DETECTED, RetryPolicy, retried
from service.errors import Unavailable
from service.interceptors.errors import as_domain_error

FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01)
TURNS = 150
INSERT = "INSERT INTO users (email, first_name, last_name) VALUES ($1, 'A', 'B')"


@pytest_asyncio.fixture
async def pooled(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(pool_size=2, max_overflow=0), database_url)
    yield engine
    await engine.dispose()


async def emails(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.scalars(text("SELECT email FROM users ORDER BY email"))).all())


async def test_commits_when_the_block_ends_and_rolls_back_when_it_raises(
    pooled: AsyncEngine, engine: AsyncEngine
) -> None:
    async with transaction(pooled) as driver:
        await driver.execute(INSERT, "kept@example.com")
    with pytest.raises(LookupError):
        async with transaction(pooled) as driver:
            await driver.execute(INSERT, "dropped@example.com")
            raise LookupError
    assert await emails(engine) == ["kept@example.com"]
    assert pooled.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_raw_deadlocks_are_retried_then_answered_unavailable(
    pooled: AsyncEngine, engine: AsyncEngine
) -> None:
    attempts = 0

    async def always_deadlocks() -> None:
        nonlocal attempts
        attempts += 1
        async with transaction(pooled) as driver:
            await driver.execute(INSERT, f"u{attempts}@example.com")
            await driver.execute(
                f"DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '{DEADLOCK_DETECTED}'; END $$"
            )

    with pytest.raises(asyncpg.DeadlockDetectedError) as caught:
        await retried(always_deadlocks, policy=FAST)
    assert attempts == FAST.attempts
    error = as_domain_error(caught.value)
    assert isinstance(error, Unavailable) and error.reason == "DATABASE_CONTENTION"
    assert await emails(engine) == []  # every attempt rolled back


async def test_a_cancelled_statement_stops_server_side_and_its_work_rolls_back(
    pooled: AsyncEngine, engine: AsyncEngine
) -> None:
    """The client goes away while its transaction waits: PostgreSQL stops the statement at
    once (it would otherwise sleep, or wait for a lock, holding what it wrote), nothing is
    committed, and the connection goes back to the pool clean."""
    started = asyncio.Event()
    pids: list[int] = []

    async def slow() -> None:
        async with transaction(pooled) as driver:
            pids.append(await driver.fetchval("SELECT pg_backend_pid()"))
            await driver.execute(INSERT, "cut@example.com")
            started.set()
            await driver.execute("SELECT pg_sleep(30)")

    task = asyncio.ensure_future(slow())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)  # the bound turns a 30 s sleep into a failure
    assert pooled.pool.checkedout() == 0  # type: ignore[attr-defined]
    async with engine.connect() as conn:
        state = await conn.scalar(
            text("SELECT state FROM pg_stat_activity WHERE pid = :pid"), {"pid": pids[0]}
        )
    assert state == "idle"  # not sleeping, not idle in transaction
    assert await emails(engine) == []
    async with transaction(pooled) as driver:  # the same connection serves the next caller
        await driver.execute(INSERT, "next@example.com")
    assert await emails(engine) == ["next@example.com"]


async def test_a_cancellation_at_any_point_leaves_no_connection_in_a_transaction(
    database_url: str, engine: AsyncEngine
) -> None:
    """Cut off after 0, 1, 2, ... turns of the event loop: during the checkout, BEGIN, the
    statements, COMMIT or after. The pool's one connection must never go back inside a
    transaction, on the server or in asyncpg's own bookkeeping: the next unit of work would
    run inside it (as a savepoint), and what it "committed" would never be."""
    one = create_engine(Settings(pool_size=1, max_overflow=0), database_url)
    try:
        for turns in range(TURNS):

            async def unit(n: int = turns) -> None:
                async with transaction(one) as driver:
                    await driver.execute(INSERT, f"a{n}@example.com")
                    await driver.execute(INSERT, f"b{n}@example.com")

            task = asyncio.ensure_future(unit())
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            async with transaction(one) as driver:
                await driver.execute(INSERT, f"next{turns}@example.com")
            # Committed for real: another connection sees it.
            assert f"next{turns}@example.com" in await emails(engine), f"after {turns} turns"
    finally:
        await one.dispose()
    written = await emails(engine)
    for turns in range(TURNS):  # each cancelled unit wrote both of its rows or neither
        assert (f"a{turns}@example.com" in written) == (f"b{turns}@example.com" in written)
