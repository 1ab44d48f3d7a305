"""Deadlocks and serialization failures are retried inside the service (service/db/retry.py):
real ones, made on the real database, and the client never sees them."""

from __future__ import annotations

import asyncio
import logging
import uuid
from decimal import Decimal

import pytest
from shop.v1 import account_service_pb2 as api
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.api.interceptors.errors import as_domain_error
from service.db.errors import DEADLOCK_DETECTED, sqlstate
from service.db.models import Account, Transfer, User
from service.db.retry import RetryPolicy, transactional
from service.errors import Unavailable
from tests.factories import Factory
from tests.ledger import assert_ledger_balances

BOUND_SECONDS = 20
FAST = RetryPolicy(attempts=5, base_delay=0.001, max_delay=0.01)


async def wait_for_lock_waiters(engine: AsyncEngine, count: int = 1) -> None:
    """Until `count` backends of this database wait on a lock (synchronisation, not a timing
    assertion: the bound only turns a hang into a failure)."""
    async with engine.connect() as conn:
        for _ in range(500):
            waiting = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
            if waiting >= count:
                return
            await conn.rollback()  # a fresh snapshot of pg_stat_activity next time
            await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} backends ever waited on a lock")


async def test_transfer_that_deadlocks_is_retried_and_applied_once(
    account_stub, factory: Factory, sessions, engine: AsyncEngine, caplog
) -> None:
    a = await factory.account(balance="10.00")
    b = await factory.account(balance="10.00")
    request = api.TransferRequest(
        from_account_id=a.id, to_account_id=b.id, amount="4.00", request_id=uuid.uuid4().hex
    )
    caplog.set_level(logging.INFO, logger="service.db.retry")
    async with engine.connect() as rival:
        # The server's deadlock check (deadlock_timeout, 1 s by default) must fire first, so
        # that the server's transaction is the victim of the deadlock, not ours.
        await rival.execute(text("SET LOCAL deadlock_timeout = '30s'"))
        await rival.execute(select(Account.id).where(Account.id == b.id).with_for_update())
        call = asyncio.ensure_future(account_stub.Transfer(request))
        await wait_for_lock_waiters(engine)  # the server holds a and waits for b
        # Now we wait for a: a cycle. PostgreSQL aborts the server's transaction (40P01).
        await asyncio.wait_for(
            rival.execute(select(Account.id).where(Account.id == a.id).with_for_update()),
            BOUND_SECONDS,
        )
        await rival.commit()
    transfer = await asyncio.wait_for(call, BOUND_SECONDS)

    assert transfer.amount == "4.00"
    retried = [r for r in caplog.records if getattr(r, "sqlstate", None) == DEADLOCK_DETECTED]
    assert retried, "the server's transaction was not the deadlock victim"
    async with sessions() as session:
        rows = (
            await session.scalars(select(Transfer).where(Transfer.request_id == request.request_id))
        ).all()
        balances = dict(
            (
                await session.execute(
                    select(Account.id, Account.balance).where(Account.id.in_([a.id, b.id]))
                )
            ).all()
        )
    assert [row.id for row in rows] == [transfer.id]
    assert balances == {a.id: Decimal("6.00"), b.id: Decimal("14.00")}
    await assert_ledger_balances(sessions)
    # The same request again is the stored answer, not a second transfer.
    assert await account_stub.Transfer(request) == transfer


async def test_write_skew_under_serializable_is_retried_with_reads_rerun(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """Two SERIALIZABLE transactions each count the users and add one: run side by side, one
    must fail with 40001. The retried one runs its read again and sees the other's user."""
    both_read = asyncio.Barrier(2)
    seen: dict[str, list[int]] = {"first": [], "second": []}

    def work(name: str):
        async def attempt(session: AsyncSession) -> int:
            await session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
            count = int(await session.scalar(select(func.count()).select_from(User)) or 0)
            seen[name].append(count)
            if len(seen[name]) == 1:
                await both_read.wait()  # only the first attempts overlap
            session.add(User(email=f"{name}@example.com", first_name="A", last_name="B"))
            await session.flush()
            return count

        return attempt

    counts = await asyncio.wait_for(
        asyncio.gather(
            transactional(sessions, work("first"), policy=FAST),
            transactional(sessions, work("second"), policy=FAST),
        ),
        BOUND_SECONDS,
    )
    attempts = sorted(len(v) for v in seen.values())
    assert attempts[0] == 1 and attempts[1] >= 2, seen
    assert sorted(counts) == [0, 1]  # the retried one re-read and saw the other's user
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(User)) == 2


async def raise_sqlstate(session: AsyncSession, code: str) -> None:
    """A real error with that SQLSTATE, raised by PostgreSQL itself."""
    await session.execute(
        text(f"DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '{code}'; END $$")
    )


async def test_retry_gives_up_after_its_attempts_and_the_client_gets_unavailable(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    attempts = 0

    async def always_deadlocks(session: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        session.add(User(email=f"u{attempts}@example.com", first_name="A", last_name="B"))
        await session.flush()
        await raise_sqlstate(session, DEADLOCK_DETECTED)

    with pytest.raises(DBAPIError) as caught:
        await transactional(sessions, always_deadlocks, policy=FAST)
    assert attempts == FAST.attempts
    assert sqlstate(caught.value) == DEADLOCK_DETECTED
    error = as_domain_error(caught.value)
    assert isinstance(error, Unavailable)
    assert error.reason == "DATABASE_CONTENTION"
    async with sessions() as session:  # every attempt rolled back
        assert await session.scalar(select(func.count()).select_from(User)) == 0


async def test_other_database_errors_are_not_retried(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    attempts = 0

    async def fails(session: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        await raise_sqlstate(session, "22012")  # division_by_zero

    with pytest.raises(DBAPIError):
        await transactional(sessions, fails, policy=FAST)
    assert attempts == 1


def test_backoff_is_jittered_and_capped() -> None:
    policy = RetryPolicy(attempts=10, base_delay=0.01, max_delay=0.05)
    delays = [policy.delay(n) for n in range(1, 10) for _ in range(20)]
    assert all(0 <= d <= 0.05 for d in delays)
    assert len(set(delays)) > 1
    assert all(policy.delay(1) <= 0.01 for _ in range(50))
