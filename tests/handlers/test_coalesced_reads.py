"""GetUser and GetAccount under concurrency: calls in flight together share one statement
(WHERE id = ANY(:ids)), and each caller gets its own answer, NOT_FOUND included.

A lock on the table holds the first batches back while the rest of the calls arrive: on an
in-process server with the client in the same event loop the calls otherwise arrive about as
fast as their batches end, and how many share a statement would be up to the scheduler."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import account_service_pb2_grpc, user_service_pb2_grpc
from shop.v1 import user_service_pb2 as users_api
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.db.models import Account, AccountKind
from service.serving.server import RunningServer
from tests.conftest import StatementCounter
from tests.factories import Factory
from tests.rpc import failure_of

CALLS = 64
MISSING = 10**12  # ids no row has: MISSING + n


async def outcome(call: Any) -> Any:
    """The reply, or (code, reason) of the failure."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        return error.code(), failure_of(error).reason


def among(statements: StatementCounter, table: str) -> list[str]:
    return [s for s in statements.statements if f"FROM {table}" in s]


async def while_locked(
    server: RunningServer, engine: AsyncEngine, table: str, calls: list[Callable[[], Any]]
) -> list[Any]:
    """The calls' outcomes, started while `table` is locked: the first batches wait for the
    lock on the server, the calls that arrive meanwhile queue behind them."""
    async with engine.connect() as holder:
        await holder.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        # Made only now: a grpc call starts when it is made, and made before the lock it could
        # be answered before any batch waits.
        started = [asyncio.ensure_future(outcome(call())) for call in calls]
        bound = time.monotonic() + 10
        while not await holder.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND query LIKE '%= ANY%'"
            )
        ):
            assert time.monotonic() < bound, "no batch reached the database"
            await asyncio.sleep(0.01)
            # pg_stat_activity is read once per transaction unless its snapshot is dropped.
            await holder.execute(text("SELECT pg_stat_clear_snapshot()"))
        assert server.db is not None
        while server.db.waiting() < len(calls):  # every call is in a batch or queued
            assert time.monotonic() < bound, f"{server.db.waiting()} calls reached the batches"
            await asyncio.sleep(0.01)
        await holder.rollback()
    return await asyncio.gather(*started)


async def test_concurrent_get_users_share_statements_and_each_gets_its_own_user(
    user_stub: user_service_pb2_grpc.UserServiceStub,
    factory: Factory,
    engine: AsyncEngine,
    statements: StatementCounter,
    server: RunningServer,
) -> None:
    users = [await factory.user() for _ in range(20)]
    users.append(await factory.user(deleted=True))
    by_id = {u.id: u for u in users}
    rng = random.Random(7)
    # Distinct ids, the same id several times, and unknown ids between them.
    ids = [u.id for u in users] + [rng.choice(users).id for _ in range(CALLS - 31)]
    ids += [MISSING + n for n in range(10)]
    rng.shuffle(ids)
    assert len(ids) == CALLS

    replies = await while_locked(
        server,
        engine,
        "users",
        [partial(user_stub.GetUser, users_api.GetUserRequest(id=i)) for i in ids],
    )

    for asked, reply in zip(ids, replies, strict=True):
        if asked >= MISSING:
            assert reply == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND"), asked
        else:
            user = by_id[asked]
            assert (reply.id, reply.email, reply.last_name) == (user.id, user.email, user.last_name)
            assert reply.HasField("deleted_at") == (user.deleted_at is not None)
    sent = among(statements, "users")
    assert all("= ANY" in s for s in sent), sent
    assert 1 <= len(sent) < CALLS, len(sent)


async def test_concurrent_get_accounts_share_statements_and_each_gets_its_own_account(
    account_stub: account_service_pb2_grpc.AccountServiceStub,
    factory: Factory,
    sessions: async_sessionmaker[AsyncSession],
    engine: AsyncEngine,
    statements: StatementCounter,
    server: RunningServer,
) -> None:
    accounts = [await factory.account(balance=f"{n}.25") for n in range(1, 17)]
    by_id = {a.id: a for a in accounts}
    async with sessions() as session:
        external = await session.scalar(
            select(Account.id).where(Account.kind == AccountKind.EXTERNAL.value)
        )
    assert external is not None  # the deposits' counterpart: never reachable by id
    rng = random.Random(11)
    ids = [a.id for a in accounts] + [rng.choice(accounts).id for _ in range(CALLS - 16 - 9)]
    ids += [external] * 3 + [MISSING + n for n in range(6)]
    rng.shuffle(ids)
    assert len(ids) == CALLS

    calls = [partial(account_stub.GetAccount, accounts_api.GetAccountRequest(id=i)) for i in ids]
    replies = await while_locked(server, engine, "accounts", calls)

    for asked, reply in zip(ids, replies, strict=True):
        if asked not in by_id:
            assert reply == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"), asked
        else:
            account = by_id[asked]
            assert (reply.id, reply.user_id, reply.currency, reply.balance) == (
                account.id,
                account.user_id,
                "EUR",
                f"{account.balance:.2f}",
            )
            assert reply.balance != "0.00"  # each opened with its own deposit
            assert reply.created_at.ToDatetime().year == account.created_at.year
    sent = among(statements, "accounts")
    assert all("= ANY" in s for s in sent), sent
    assert 1 <= len(sent) < CALLS, len(sent)
