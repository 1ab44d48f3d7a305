"""A connection that breaks under a statement: the test holds a lock the call's statement waits
on, terminates that server backend (pg_terminate_backend, as a failover or an admin would), and
checks that the call answers UNAVAILABLE / DATABASE_UNAVAILABLE with a RetryInfo, and that the
next calls succeed at once on a fresh connection: the broken one is discarded, not handed back
to the pool, and nothing is left checked out or idle in a transaction.

The server has one pooled connection (pool_size=1, max_overflow=0), so "the next call" must run
on whatever the pool made of the broken connection: a broken connection returned to the pool
would fail it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import grpc
import pytest_asyncio
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import user_service_pb2 as users_api
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.models import Transfer
from tests.factories import Factory
from tests.faults.retry_info import DATABASE_UNAVAILABLE, retry_hint
from tests.servers import OwnServer, own_server

DEADLINE = 30.0  # bounds each call, so a hang fails the test instead of stalling the run
SERVER_SESSIONS = (
    "FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name LIKE 'shop-service/%'"
)


class Backends:
    """The server backends the pool opened, in order (their pids)."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def __call__(self, dbapi_connection: Any, _record: Any) -> None:
        self.pids.append(dbapi_connection.driver_connection.get_server_pid())


@pytest_asyncio.fixture
async def one_connection(database_url: str) -> AsyncIterator[tuple[OwnServer, Backends]]:
    async with own_server(database_url, pool_size=1, max_overflow=0, pool_timeout=10.0) as server:
        backends = Backends()
        event.listen(server.running.engine.sync_engine, "connect", backends)
        yield server, backends
        event.remove(server.running.engine.sync_engine, "connect", backends)


@asynccontextmanager
async def holding(engine: AsyncEngine, statement: str, **params: Any) -> AsyncIterator[None]:
    """A lock the test holds (in its own transaction) until the block ends."""
    async with engine.connect() as holder:
        await holder.execute(text(statement), params)
        try:
            yield
        finally:
            await holder.rollback()


async def waiting_backend(engine: AsyncEngine) -> int:
    """The server backend waiting on the test's lock."""
    bound = time.monotonic() + 10
    while True:
        async with engine.connect() as conn:
            pids = (
                await conn.scalars(
                    text(f"SELECT pid {SERVER_SESSIONS} AND wait_event_type = 'Lock'")
                )
            ).all()
        if pids:
            [pid] = pids
            return int(pid)
        assert time.monotonic() < bound, "no server statement waits on the lock"
        await asyncio.sleep(0.02)


async def break_under(
    engine: AsyncEngine, lock: str, call: Callable[[], Awaitable[Any]], **params: Any
) -> tuple[grpc.aio.AioRpcError, int]:
    """Start the call while the test holds `lock` (a callable: a grpc call starts when it is
    made), terminate the backend its statement waits on, and return the call's error and the
    terminated backend's pid."""
    async with holding(engine, lock, **params):
        running = asyncio.ensure_future(call())
        pid = await waiting_backend(engine)
        async with engine.connect() as admin:
            assert await admin.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        try:
            await asyncio.wait_for(running, DEADLINE)
        except grpc.aio.AioRpcError as error:
            return error, pid
    raise AssertionError("the call succeeded on a connection terminated under its statement")


async def assert_pool_healthy(server: OwnServer, engine: AsyncEngine, broken: int) -> None:
    """Nothing checked out, the broken backend gone, no server session idle in a transaction."""
    pool = server.running.engine.pool
    bound = time.monotonic() + 10
    while pool.checkedout():  # type: ignore[attr-defined]
        assert time.monotonic() < bound, "a connection stays checked out"
        await asyncio.sleep(0.02)
    async with engine.connect() as conn:
        sessions = (await conn.execute(text(f"SELECT pid, state {SERVER_SESSIONS}"))).all()
    assert broken not in {pid for pid, _ in sessions}
    assert not [s for s in sessions if (s.state or "").startswith("idle in transaction")]


async def next_calls_succeed(
    backends: Backends, broken: int, calls: Callable[[], Awaitable[None]]
) -> None:
    """The calls after the broken one succeed at the first attempt, on a new backend."""
    opened = len(backends.pids)
    await calls()
    assert broken not in backends.pids[opened:]
    assert len(backends.pids) > opened, "no fresh connection replaced the broken one"


async def test_get_user_on_a_connection_broken_under_its_statement_is_unavailable(
    one_connection: tuple[OwnServer, Backends], engine: AsyncEngine, factory: Factory
) -> None:
    server, backends = one_connection
    user = await factory.user()
    get = users_api.GetUserRequest(id=user.id)
    assert (await server.users.GetUser(get, timeout=DEADLINE)).id == user.id

    error, broken = await break_under(
        engine, "LOCK TABLE users IN ACCESS EXCLUSIVE MODE", lambda: server.users.GetUser(get)
    )
    assert retry_hint(error) == DATABASE_UNAVAILABLE, error

    async def calls() -> None:
        for _ in range(3):
            assert (await server.users.GetUser(get, timeout=DEADLINE)).id == user.id

    await next_calls_succeed(backends, broken, calls)
    await assert_pool_healthy(server, engine, broken)


async def stored_transfers(engine: AsyncEngine, request_id: str) -> int:
    async with engine.connect() as conn:
        query = select(func.count()).where(Transfer.request_id == request_id)
        return int(await conn.scalar(query) or 0)


async def test_transfer_on_a_connection_broken_under_its_batch_is_unavailable_and_applies_nothing(
    one_connection: tuple[OwnServer, Backends], engine: AsyncEngine, factory: Factory
) -> None:
    server, backends = one_connection
    source = await factory.account(balance="10.00")
    target = await factory.account()

    def transfer(request_id: str) -> accounts_api.TransferRequest:
        return accounts_api.TransferRequest(
            from_account_id=source.id, to_account_id=target.id, amount="1.00", request_id=request_id
        )

    # The money writer's batch waits on the source's row lock, in its transaction.
    error, broken = await break_under(
        engine,
        "SELECT 1 FROM accounts WHERE id = :id FOR UPDATE",
        lambda: server.accounts.Transfer(transfer("broken")),
        id=source.id,
    )
    assert retry_hint(error) == DATABASE_UNAVAILABLE, error
    stored = await stored_transfers(engine, "broken")
    assert stored == 0  # the batch's transaction died with its connection

    async def calls() -> None:
        for request_id in ("after-1", "after-2", "broken"):  # the retry applies it, once
            done = await server.accounts.Transfer(transfer(request_id), timeout=DEADLINE)
            assert done.request_id == request_id

    await next_calls_succeed(backends, broken, calls)
    account = await server.accounts.GetAccount(
        accounts_api.GetAccountRequest(id=source.id), timeout=DEADLINE
    )
    assert Decimal(account.balance) == Decimal("7.00")
    assert await stored_transfers(engine, "broken") == 1
    await assert_pool_healthy(server, engine, broken)


async def test_stream_users_on_a_connection_broken_under_its_statement_is_unavailable(
    one_connection: tuple[OwnServer, Backends], engine: AsyncEngine, factory: Factory
) -> None:
    server, backends = one_connection
    for _ in range(3):
        await factory.user()

    async def drain() -> int:
        stream = server.users.StreamUsers(users_api.StreamUsersRequest(batch_size=2))
        return sum([len(batch.users) async for batch in stream])

    # The export's snapshot has begun; its SELECT waits on the lock.
    error, broken = await break_under(engine, "LOCK TABLE users IN ACCESS EXCLUSIVE MODE", drain)
    assert retry_hint(error) == DATABASE_UNAVAILABLE, error

    async def calls() -> None:
        for _ in range(2):
            assert await asyncio.wait_for(drain(), DEADLINE) == 3

    await next_calls_succeed(backends, broken, calls)
    await assert_pool_healthy(server, engine, broken)
