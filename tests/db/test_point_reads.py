"""Coalesced point reads (Database.point_reads, GetUser's and GetAccount's path) under
cancellation: a read whose callers have all gone away stops server-side, and its connection goes
back to the pool, never inside a transaction. The batchers' connections kept while calls queue
(the money writer's too) and given back once idle or after KEPT_BATCHES in a row. Ported from
the driver path's tests (tests/db/test_driver.py) when GetUser moved onto SQLAlchemy."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import pytest
import pytest_asyncio
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.config import Settings
from service.db.coalescer import Outcome
from service.db.database import KEPT_BATCHES, Database
from service.db.engine import create_engine, create_sessionmaker
from service.db.transaction import AUTOCOMMIT_READS
from service.errors import NotFound
from service.serving.server import RunningServer
from tests.factories import Factory

TURNS = 60
# Seconds: a hang cap, room for a loaded machine, yet half of the 30 s a read that ran on
# (not cancelled server-side) would take. No speed is promised.
BOUND = 15.0
# GetUser's deadline while its read waits on a lock: room to see the read waiting first.
READ_DEADLINE = 3.0


@pytest_asyncio.fixture(params=[True, False], ids=["autocommit", "pgbouncer-transaction"])
async def one_pool(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine whose pool has one connection: in autocommit, or in a transaction per read
    as behind PgBouncer (SHOP_PGBOUNCER)."""
    engine = create_engine(
        Settings(pool_size=1, max_overflow=0, pgbouncer=not request.param), database_url
    )
    yield engine
    await engine.dispose()


@pytest.fixture
def one(one_pool: AsyncEngine) -> Database:
    """The Database on one_pool (the test reads the pool through one_pool)."""
    return Database(one_pool, create_sessionmaker(one_pool))


async def sleep_then_echo(conn: AsyncConnection, keys: Sequence[int]) -> list[Outcome[int]]:
    """A read that takes 30 s on the server unless cancelled; -1 is not found."""
    await conn.execute(text("SELECT pg_sleep(30)"))
    return [k if k >= 0 else NotFound("thing", k) for k in keys]


async def echo(conn: AsyncConnection, keys: Sequence[int]) -> list[Outcome[int]]:
    found = set(await conn.scalars(text("SELECT unnest(CAST(:k AS bigint[]))"), {"k": keys}))
    return [k if k in found and k >= 0 else NotFound("thing", k) for k in keys]


async def eventually(check: Callable[[], object], what: str) -> None:
    bound = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < bound, what
        await asyncio.sleep(0.01)


async def server_states(engine: AsyncEngine, like: str) -> list[str]:
    """pg_stat_activity states of the other connections whose last query was like `like`."""
    return [state for state, _wait in await server_waits(engine, like)]


async def server_waits(engine: AsyncEngine, like: str) -> list[tuple[str, str | None]]:
    """(state, wait_event_type) of the other connections whose last query was like `like`."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT state, wait_event_type FROM pg_stat_activity "
                "WHERE query LIKE :like AND pid <> pg_backend_pid()"
            ),
            {"like": like},
        )
        return [(state, wait) for state, wait in rows]


async def test_a_cancelled_read_stops_server_side_and_the_pool_serves_on(
    one: Database, one_pool: AsyncEngine, engine: AsyncEngine
) -> None:
    """The caller goes away while its batch runs: the batch, which no one else waits for, is
    cancelled, PostgreSQL stops its statement, no connection stays checked out or inside a
    transaction, and the pool's one connection answers the next caller at once."""
    sleepy = one.point_reads(sleep_then_echo)
    task = asyncio.ensure_future(sleepy.submit(1))
    bound = time.monotonic() + BOUND
    while "active" not in await server_states(engine, "SELECT pg_sleep%"):
        assert time.monotonic() < bound, "the sleep never started"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, BOUND)
    pool = one_pool.pool
    await eventually(lambda: pool.checkedout() == 0, "a connection stayed checked out")  # type: ignore[attr-defined]
    # asyncpg's cancel request reaches the server on a connection of its own: soon, not at once.
    bound = time.monotonic() + BOUND
    while "active" in (states := await server_states(engine, "SELECT pg_sleep%")):
        assert time.monotonic() < bound, "the sleep ran on"
        await asyncio.sleep(0.01)
    assert "idle in transaction" not in states, states
    reads = one.point_reads(echo)
    assert await asyncio.wait_for(reads.submit(7), BOUND) == 7


async def test_a_batch_runs_on_for_the_callers_still_waiting(one: Database) -> None:
    """One caller of a batch goes away, its neighbour does not: the batch finishes and the
    neighbour gets its answer (the statement is shared, so it is not the caller's to stop)."""
    reads = one.point_reads(echo)
    gate = asyncio.Event()

    async def gated(conn: AsyncConnection, keys: Sequence[int]) -> list[Outcome[int]]:
        await gate.wait()
        return await echo(conn, keys)

    held = one.point_reads(gated)
    first = asyncio.ensure_future(held.submit(1))
    second = asyncio.ensure_future(held.submit(2))
    await asyncio.sleep(0.05)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    assert await asyncio.wait_for(second, BOUND) == 2
    assert await reads.submit(3) == 3


async def test_a_cancellation_at_any_point_leaves_no_connection_in_a_transaction(
    one: Database, one_pool: AsyncEngine, engine: AsyncEngine
) -> None:
    """Cut off after 0, 1, 2, ... turns of the event loop: in the queue, during the checkout,
    the statement or after. The pool's one connection never goes back checked out or inside a
    transaction, and serves the next read."""
    reads = one.point_reads(echo)
    for turns in range(TURNS):
        task = asyncio.ensure_future(reads.submit(turns))
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        after = 1000 + turns
        assert await asyncio.wait_for(reads.submit(after), BOUND) == after, f"after {turns} turns"
    await eventually(lambda: one_pool.pool.checkedout() == 0, "checked out")  # type: ignore[attr-defined]
    states = await server_states(engine, "SELECT unnest%")
    assert "idle in transaction" not in states, states


async def test_a_cancelled_get_user_leaves_nothing_behind(
    user_stub: user_service_pb2_grpc.UserServiceStub,
    server: RunningServer,
    factory: Factory,
    engine: AsyncEngine,
) -> None:
    """GetUser's deadline passes while its statement waits for a lock: the call answers
    DEADLINE_EXCEEDED, its statement stops waiting on the server, and the server holds no
    connection (checked out, waiting, or idle in a transaction) for it."""
    user = await factory.user()
    async with engine.connect() as holder:
        await holder.execute(text("LOCK TABLE users IN ACCESS EXCLUSIVE MODE"))
        call = asyncio.ensure_future(
            user_stub.GetUser(api.GetUserRequest(id=user.id), timeout=READ_DEADLINE)
        )
        # First the read is seen on the server, waiting for the lock (so "gone" below is
        # the statement stopped, not one that never started).
        bound = time.monotonic() + BOUND
        while ("active", "Lock") not in await server_waits(engine, "%= ANY%"):
            assert not call.done(), "GetUser ended before its read was seen waiting"
            assert time.monotonic() < bound, "the read never reached the server"
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        pool = server.engine.pool
        await eventually(lambda: pool.checkedout() == 0, "GetUser kept its connection")  # type: ignore[attr-defined]
        bound = time.monotonic() + BOUND
        while "active" in (states := await server_states(engine, "%= ANY%")):
            assert time.monotonic() < bound, states
            await asyncio.sleep(0.01)
        assert "idle in transaction" not in states, states
        await holder.rollback()
    again = await user_stub.GetUser(api.GetUserRequest(id=user.id), timeout=BOUND)
    assert again.id == user.id


def count_checkouts(engine: AsyncEngine) -> list[int]:
    """A one-element list that counts the pool's checkouts from now on."""
    counted = [0]

    def checkout(*_: object) -> None:
        counted[0] += 1

    event.listen(engine.sync_engine.pool, "checkout", checkout)
    return counted


async def test_batches_back_to_back_keep_one_connection_and_an_idle_batcher_holds_none(
    one: Database, one_pool: AsyncEngine
) -> None:
    """Reads queued faster than batches run (one read per batch here): in autocommit each run
    of KEPT_BATCHES batches takes one connection from the pool instead of one per batch; behind
    PgBouncer every read is a transaction of its own, so each batch takes its own. Either way,
    once nothing is queued the connection is back in the pool."""
    reads = one.point_reads(echo, max_batch=1)
    checkouts = count_checkouts(one_pool)
    calls = 136  # more than two runs of KEPT_BATCHES (64)
    answers = await asyncio.wait_for(
        asyncio.gather(*(reads.submit(n) for n in range(calls))), BOUND
    )
    assert answers == list(range(calls))
    autocommit = one_pool.get_execution_options().get(AUTOCOMMIT_READS, True)
    if autocommit:
        assert checkouts[0] == math.ceil(calls / KEPT_BATCHES) < calls / 2
    else:
        assert checkouts[0] == calls
    assert one_pool.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_kept_connection_goes_back_in_turn_for_a_caller_waiting_on_the_pool(
    database_url: str,
) -> None:
    """A pool of one in autocommit (the reads that keep their connection), a batcher busy
    without a pause: another caller waiting for the pool gets the connection while the batcher
    still has reads queued, within KEPT_BATCHES batches."""
    engine = create_engine(Settings(pool_size=1, max_overflow=0), database_url)
    reads = Database(engine, create_sessionmaker(engine)).point_reads(echo, max_batch=1)
    calls = 256  # four runs of KEPT_BATCHES (64)
    busy = asyncio.ensure_future(asyncio.gather(*(reads.submit(n) for n in range(calls))))
    try:
        # The batcher has the pool's one connection and keeps it (batches are running).
        await eventually(lambda: reads.batches > 1, "no batch ran")
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        async with asyncio.timeout(BOUND), engine.connect() as other:
            assert await other.scalar(text("SELECT 1")) == 1
            assert not busy.done(), "the other caller waited for every queued read"
        assert await asyncio.wait_for(busy, BOUND) == list(range(calls))
    finally:
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
        await engine.dispose()


async def test_the_money_writers_batches_keep_their_connections_while_items_queue(
    database_url: str,
) -> None:
    """The group-commit writer's batches (two at once under a long queue) keep their
    connections the same way: far fewer checkouts than batches, and none held once idle."""
    engine = create_engine(Settings(pool_size=4, max_overflow=0), database_url)
    try:
        writer = Database(engine, create_sessionmaker(engine)).batched(echo, max_batch=1)
        checkouts = count_checkouts(engine)
        calls = 136
        answers = await asyncio.wait_for(
            asyncio.gather(*(writer.submit(n) for n in range(calls))), BOUND
        )
        assert answers == list(range(calls))
        assert writer.coalescer.batches == calls
        assert checkouts[0] < calls / 8
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
