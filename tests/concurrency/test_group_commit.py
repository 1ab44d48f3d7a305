"""Group commit for money (service/app/money_writer.py): concurrent Transfer, Deposit and
Withdraw calls share transactions, and each still gets its own outcome, through a real server
and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from decimal import Decimal

import grpc
import pytest
from shop.v1 import account_service_pb2 as api
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.database import OVERLAP_FROM
from service.db.errors import SERIALIZATION_FAILURE
from service.db.models import Account, Transfer
from service.serving.server import RunningServer
from tests.concurrency.test_retry import wait_for_lock_waiters
from tests.conftest import StatementCounter
from tests.factories import Factory
from tests.handlers.test_batch_transfer import reason
from tests.ids import rid
from tests.ledger import assert_ledger_balances, customer_transfers
from tests.rpc import failure_of
from tests.servers import own_server

BOUND_SECONDS = 30
CALLS = 48


def batches(statements: StatementCounter) -> int:
    """Transactions the money writer ran: each batch claims its request_ids once."""
    return sum(1 for s in statements.statements if "INSERT INTO idempotency_keys" in s)


async def balances(engine: AsyncEngine, *ids: int) -> dict[int, Decimal]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(Account.id, Account.balance).where(Account.id.in_(ids)))
        return dict(rows.all())


async def test_concurrent_transfers_share_transactions_and_each_gets_its_own_transfer(
    account_stub, factory: Factory, sessions, engine: AsyncEngine, statements: StatementCounter
) -> None:
    a = await factory.account(balance="2000.00")
    b = await factory.account(balance="0.00")
    requests = [
        api.TransferRequest(
            from_account_id=a.id, to_account_id=b.id, amount=f"{n + 1}.00", request_id=rid()
        )
        for n in range(CALLS)
    ]
    done = await asyncio.wait_for(
        asyncio.gather(*(account_stub.Transfer(r) for r in requests)), BOUND_SECONDS
    )

    assert [t.request_id for t in done] == [r.request_id for r in requests]
    assert [t.amount for t in done] == [r.amount for r in requests]
    assert len({t.id for t in done}) == CALLS
    moved = sum(Decimal(r.amount) for r in requests)
    assert await balances(engine, a.id, b.id) == {a.id: 2000 - moved, b.id: moved}
    # Fewer transactions than calls: some batch held more than one transfer.
    assert 1 <= batches(statements) < CALLS, batches(statements)
    await assert_ledger_balances(sessions)


async def until_waiting(server: RunningServer, calls: int) -> None:
    """Until `calls` calls wait on the server's batches (queued or in a running batch)."""
    assert server.db is not None
    for _ in range(1000):
        if server.db.waiting() >= calls:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{server.db.waiting()} of {calls} calls reached the batches")


async def test_a_refused_transfer_does_not_fail_its_neighbours_in_the_same_batch(
    account_stub,
    factory: Factory,
    sessions,
    engine: AsyncEngine,
    statements: StatementCounter,
    server: RunningServer,
) -> None:
    """The writer's transaction waits on a row the test holds, so the next five calls queue
    (too few to start a batch beside it) and run as one batch: the one that would overdraw,
    the one across currencies and the one to a missing account are refused, the others apply,
    in the order they came."""
    a = await factory.account(balance="10.00")
    b = await factory.account(balance="0.00")
    usd = await factory.account(currency="USD", balance="5.00")
    held = await factory.account(balance="1.00")
    other = await factory.account(balance="1.00")
    async with engine.connect() as holder:
        await holder.execute(select(Account.id).where(Account.id == held.id).with_for_update())
        blocked = asyncio.ensure_future(
            account_stub.Transfer(
                api.TransferRequest(
                    from_account_id=held.id,
                    to_account_id=other.id,
                    amount="1.00",
                    request_id=rid(),
                )
            )
        )
        await wait_for_lock_waiters(engine)
        calls = [
            api.TransferRequest(from_account_id=a.id, to_account_id=b.id, amount="6.00"),
            api.TransferRequest(from_account_id=a.id, to_account_id=b.id, amount="6.00"),
            api.TransferRequest(from_account_id=a.id, to_account_id=usd.id, amount="1.00"),
            api.TransferRequest(from_account_id=a.id, to_account_id=999_999, amount="1.00"),
            api.TransferRequest(from_account_id=a.id, to_account_id=b.id, amount="4.00"),
        ]
        for call in calls:
            call.request_id = rid()
        pending = [asyncio.ensure_future(account_stub.Transfer(c)) for c in calls]
        await until_waiting(server, 1 + len(calls))  # all in the writer's hands
        await holder.rollback()
    await asyncio.wait_for(blocked, BOUND_SECONDS)
    outcomes = await asyncio.wait_for(
        asyncio.gather(*pending, return_exceptions=True), BOUND_SECONDS
    )

    assert batches(statements) == 2  # the one held back, then the five together
    assert outcomes[0].amount == "6.00"
    refused = [failure_of(o) for o in outcomes[1:4]]
    assert [(f.code, f.reason) for f in refused] == [
        (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS"),
        (grpc.StatusCode.FAILED_PRECONDITION, "CURRENCY_MISMATCH"),
        (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"),
    ]
    assert outcomes[4].amount == "4.00"
    assert await balances(engine, a.id, b.id, usd.id) == {
        a.id: Decimal("0.00"),
        b.id: Decimal("10.00"),
        usd.id: Decimal("5.00"),
    }
    await assert_ledger_balances(sessions)


async def test_a_refused_request_id_is_released_so_the_same_request_succeeds_later(
    account_stub, factory: Factory, engine: AsyncEngine
) -> None:
    a = await factory.account(balance="1.00")
    b = await factory.account()
    request = api.TransferRequest(
        from_account_id=a.id, to_account_id=b.id, amount="5.00", request_id=rid()
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await account_stub.Transfer(request)
    assert failure_of(refused.value).reason == "INSUFFICIENT_FUNDS"
    await account_stub.Deposit(api.DepositRequest(account_id=a.id, amount="4.00", request_id=rid()))
    transfer = await account_stub.Transfer(request)
    assert transfer.amount == "5.00"
    assert await balances(engine, a.id, b.id) == {a.id: Decimal("0.00"), b.id: Decimal("5.00")}


async def test_deposits_and_withdrawals_ride_the_same_writer(
    account_stub, factory: Factory, sessions, engine: AsyncEngine, statements: StatementCounter
) -> None:
    accounts = [await factory.account(balance="50.00") for _ in range(4)]
    calls = []
    request_ids = [rid() for _ in range(CALLS)]
    for n, request_id in enumerate(request_ids):
        account = accounts[(n // 2) % len(accounts)]
        if n % 2:
            calls.append(
                account_stub.Withdraw(
                    api.WithdrawRequest(account_id=account.id, amount="1.00", request_id=request_id)
                )
            )
        else:
            calls.append(
                account_stub.Deposit(
                    api.DepositRequest(account_id=account.id, amount="2.00", request_id=request_id)
                )
            )
    await asyncio.wait_for(asyncio.gather(*calls), BOUND_SECONDS)

    expected = {a.id: Decimal("50.00") + Decimal(CALLS // len(accounts) // 2) for a in accounts}
    assert await balances(engine, *expected) == expected
    assert 1 <= batches(statements) < CALLS
    # One writer: some transaction (rows with the same xmin) holds both a deposit (into one of
    # the accounts, from the external one) and a withdrawal (out of one). Two writers, one per
    # kind, would pass everything above yet never write both in one transaction.
    async with engine.connect() as conn:
        kinds = await conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE to_account_id = ANY(:ids)),"
                " count(*) FILTER (WHERE from_account_id = ANY(:ids))"
                " FROM transfers WHERE request_id = ANY(:rids) GROUP BY xmin::text"
            ),
            {"ids": list(expected), "rids": request_ids},
        )
        per_transaction = [tuple(row) for row in kinds]
    assert sum(d + w for d, w in per_transaction) == CALLS
    assert any(d and w for d, w in per_transaction), per_transaction
    await assert_ledger_balances(sessions)


async def test_a_caller_cancelled_mid_batch_finds_its_transfer_under_its_request_id(
    account_stub, factory: Factory, sessions, engine: AsyncEngine, server: RunningServer
) -> None:
    a = await factory.account(balance="10.00")
    b = await factory.account()
    request = api.TransferRequest(
        from_account_id=a.id, to_account_id=b.id, amount="3.00", request_id=rid()
    )
    async with engine.connect() as holder:
        await holder.execute(select(Account.id).where(Account.id == a.id).with_for_update())
        call = account_stub.Transfer(request)
        pending = asyncio.ensure_future(call)
        await wait_for_lock_waiters(engine)  # the batch waits for a's lock
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await holder.rollback()

    # The batch went on without its caller and committed before any retry was sent (a batch
    # cancelled with its caller would leave no row here, and the retry would apply it anew
    # with the same visible result).
    await until_waiting_drops(server)
    async with sessions() as session:
        committed = (await session.scalars(customer_transfers())).all()
    assert [row.request_id for row in committed] == [request.request_id]
    # The retry is answered from the stored response: the same transfer, no second one.
    transfer = await asyncio.wait_for(account_stub.Transfer(request), BOUND_SECONDS)
    assert transfer.amount == "3.00"
    async with sessions() as session:
        rows = (await session.scalars(customer_transfers())).all()
    assert [row.id for row in rows] == [committed[0].id] == [transfer.id]
    assert await balances(engine, a.id, b.id) == {a.id: Decimal("7.00"), b.id: Decimal("3.00")}


async def test_a_batch_that_meets_a_serialization_failure_runs_again_whole(
    account_stub, factory: Factory, sessions, engine: AsyncEngine, caplog
) -> None:
    """A real 40001 from PostgreSQL on the batch's first attempt (a trigger raises it once):
    the whole batch rolls back and runs again, and every item is applied once."""
    a = await factory.account(balance="10.00")
    b = await factory.account()
    async with engine.begin() as conn:
        # A sequence, not a table: nextval is not undone by the rollback it causes.
        await conn.execute(text("CREATE SEQUENCE fail_once"))
        await conn.execute(
            text(
                "CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF nextval('fail_once') = 1 THEN "
                "  RAISE EXCEPTION 'injected' USING ERRCODE = '40001'; "
                "END IF; RETURN NEW; END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER fail_once BEFORE INSERT ON transfers "
                "FOR EACH STATEMENT EXECUTE FUNCTION fail_once()"
            )
        )
    caplog.set_level(logging.INFO, logger="service.db.retry")
    try:
        response = await account_stub.BatchTransfer(
            api.BatchTransferRequest(
                requests=[
                    api.TransferRequest(
                        from_account_id=a.id, to_account_id=b.id, amount="1.00", request_id=rid()
                    )
                    for _ in range(3)
                ]
            )
        )
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER fail_once ON transfers"))
            await conn.execute(text("DROP FUNCTION fail_once()"))
            await conn.execute(text("DROP SEQUENCE fail_once"))

    assert [r.WhichOneof("result") for r in response.results] == ["transfer"] * 3
    retried = [r for r in caplog.records if getattr(r, "sqlstate", None) == SERIALIZATION_FAILURE]
    assert len(retried) == 1
    async with sessions() as session:
        count = await session.scalar(select(func.count()).select_from(Transfer))
    assert count == 3 + 1  # the three, and the factory's opening deposit
    assert await balances(engine, a.id, b.id) == {a.id: Decimal("7.00"), b.id: Decimal("3.00")}
    await assert_ledger_balances(sessions)


async def test_a_request_id_claimed_meanwhile_by_a_concurrent_batch_runs_the_batch_again(
    account_stub, factory: Factory, sessions, engine: AsyncEngine, caplog
) -> None:
    """Two batches post one request_id (different requests, different accounts, so no account
    lock orders them): the first inserts its key and is held before its commit; the second
    read no key, so it inserts one too, waits for the first, is refused (ConcurrentClaim),
    runs again whole, and answers REQUEST_ID_REUSED from the key the first committed, while
    its other postings are applied once."""
    a, b = await factory.account(balance="10.00"), await factory.account()
    c, d = await factory.account(balance="100.00"), await factory.account()
    shared = rid()
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE FUNCTION hold_claim() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.request_id = '{shared}' THEN PERFORM pg_advisory_xact_lock_shared(2201); "
                "END IF; RETURN NULL; END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER hold_claim AFTER INSERT ON idempotency_keys "
                "FOR EACH ROW EXECUTE FUNCTION hold_claim()"
            )
        )
    caplog.set_level(logging.INFO, logger="service.db.retry")
    try:
        async with engine.connect() as holder:
            await holder.execute(text("SELECT pg_advisory_lock(2201)"))
            first = asyncio.ensure_future(
                account_stub.Transfer(
                    api.TransferRequest(
                        from_account_id=a.id, to_account_id=b.id, amount="1.00", request_id=shared
                    )
                )
            )
            await wait_for_lock_waiters(engine)  # the first batch holds its uncommitted key
            # 64 postings: a batch that large starts beside the running one (OVERLAP_FROM).
            second = asyncio.ensure_future(
                account_stub.BatchTransfer(
                    api.BatchTransferRequest(
                        requests=[
                            api.TransferRequest(
                                from_account_id=c.id,
                                to_account_id=d.id,
                                amount="2.00" if n == 0 else "1.00",
                                request_id=shared if n == 0 else rid(),
                            )
                            for n in range(OVERLAP_FROM)
                        ]
                    )
                )
            )
            await wait_for_lock_waiters(engine, 2)  # the second's key waits for the first
            await holder.execute(text("SELECT pg_advisory_unlock(2201)"))
            done = await asyncio.wait_for(first, BOUND_SECONDS)
            answered = await asyncio.wait_for(second, BOUND_SECONDS)
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER hold_claim ON idempotency_keys"))
            await conn.execute(text("DROP FUNCTION hold_claim()"))

    assert done.amount == "1.00"
    reused, *applied = answered.results
    assert reused.WhichOneof("result") == "error"
    assert reason(reused.error) == "REQUEST_ID_REUSED"
    assert [r.transfer.amount for r in applied] == ["1.00"] * (OVERLAP_FROM - 1)
    raced = [r for r in caplog.records if getattr(r, "sqlstate", None) == "23505"]
    assert len(raced) == 1
    assert await balances(engine, a.id, b.id, c.id, d.id) == {
        a.id: Decimal("9.00"),
        b.id: Decimal("1.00"),
        c.id: Decimal(100 - OVERLAP_FROM + 1),
        d.id: Decimal(OVERLAP_FROM - 1),
    }
    await assert_ledger_balances(sessions)


TURNS = 80


async def test_a_caller_cancelled_at_any_point_leaves_its_transfer_whole_and_no_connection_busy(
    database_url: str, factory: Factory, sessions, engine: AsyncEngine
) -> None:
    """Cut off after 0, 1, 2, ... turns of the event loop (the server runs on the test's loop):
    before the call reaches the writer, while its batch runs, or after. Each transfer is then
    applied whole or not at all, its retry answers it exactly once, the next call commits for
    real, and no connection stays checked out or idle in a transaction."""
    a = await factory.account(balance="100.00")
    b = await factory.account()
    async with own_server(database_url, pool_size=1, max_overflow=0) as server:
        stub = server.accounts
        requests = []
        for turns in range(TURNS):
            request = api.TransferRequest(
                from_account_id=a.id, to_account_id=b.id, amount="0.01", request_id=f"cx-{turns}"
            )
            requests.append(request)
            call = stub.Transfer(request)
            task = asyncio.ensure_future(call)
            for _ in range(turns):
                await asyncio.sleep(0)
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
            after = api.TransferRequest(
                from_account_id=b.id, to_account_id=a.id, amount="0.01", request_id=rid()
            )
            with contextlib.suppress(grpc.aio.AioRpcError):  # b may hold nothing yet
                await asyncio.wait_for(stub.Transfer(after), BOUND_SECONDS)
        answers = [await asyncio.wait_for(stub.Transfer(r), BOUND_SECONDS) for r in requests]
        pool = server.running.engine.sync_engine.pool
        assert pool.checkedout() == 0

    assert [t.request_id for t in answers] == [r.request_id for r in requests]
    async with sessions() as session:
        rows = (await session.scalars(customer_transfers())).all()
    per_request = Counter(row.request_id for row in rows if row.request_id.startswith("cx-"))
    assert per_request == Counter(r.request_id for r in requests)
    assert {row.id for row in rows if row.request_id.startswith("cx-")} == {t.id for t in answers}
    async with engine.connect() as conn:
        idle_in_tx = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%'"
            )
        )
    assert idle_in_tx == 0
    assert sum((await balances(engine, a.id, b.id)).values()) == Decimal("100.00")
    await assert_ledger_balances(sessions)


async def test_a_batch_that_deadlocks_on_every_attempt_is_unavailable_and_applies_nothing(
    account_stub, factory: Factory, sessions, engine: AsyncEngine
) -> None:
    a = await factory.account(balance="10.00")
    b = await factory.account()
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE FUNCTION always_deadlock() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "RAISE EXCEPTION 'injected' USING ERRCODE = '40P01'; END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER always_deadlock BEFORE INSERT ON transfers "
                "FOR EACH STATEMENT EXECUTE FUNCTION always_deadlock()"
            )
        )
    request = api.TransferRequest(
        from_account_id=a.id, to_account_id=b.id, amount="1.00", request_id=rid()
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(account_stub.Transfer(request), BOUND_SECONDS)
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER always_deadlock ON transfers"))
            await conn.execute(text("DROP FUNCTION always_deadlock()"))
    failure = failure_of(caught.value)
    assert (failure.code, failure.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_CONTENTION",
    )
    assert await balances(engine, a.id, b.id) == {a.id: Decimal("10.00"), b.id: Decimal("0.00")}
    # Nothing was kept of it, its claim included: the same request now goes through.
    assert (await account_stub.Transfer(request)).amount == "1.00"


async def test_shutdown_lets_a_running_batch_commit_for_a_caller_cut_off_by_the_grace(
    database_url: str, factory: Factory, engine: AsyncEngine
) -> None:
    a = await factory.account(balance="10.00")
    b = await factory.account()
    request = api.TransferRequest(
        from_account_id=a.id, to_account_id=b.id, amount="2.00", request_id=rid()
    )
    async with own_server(database_url) as server, engine.connect() as holder:
        await holder.execute(select(Account.id).where(Account.id == a.id).with_for_update())
        call = asyncio.ensure_future(server.accounts.Transfer(request))
        await wait_for_lock_waiters(engine)
        stopping = asyncio.ensure_future(server.running.stop(grace=0.1))
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(call, BOUND_SECONDS)  # cut off by the grace
        assert not stopping.done()  # the batch still runs, waiting for our lock
        await holder.rollback()
        await asyncio.wait_for(stopping, BOUND_SECONDS)
    # It committed: the caller's retry (to any server) finds it under its request_id.
    assert await balances(engine, a.id, b.id) == {a.id: Decimal("8.00"), b.id: Decimal("2.00")}


async def test_shutdown_rolls_back_a_batch_that_outlives_the_drain_window(
    database_url: str, factory: Factory, engine: AsyncEngine, monkeypatch, caplog
) -> None:
    monkeypatch.setattr("service.serving.server.BATCH_DRAIN_SECONDS", 0.3)
    a = await factory.account(balance="10.00")
    b = await factory.account()
    request = api.TransferRequest(
        from_account_id=a.id, to_account_id=b.id, amount="2.00", request_id=rid()
    )
    async with own_server(database_url) as server, engine.connect() as holder:
        await holder.execute(select(Account.id).where(Account.id == a.id).with_for_update())
        call = asyncio.ensure_future(server.accounts.Transfer(request))
        await wait_for_lock_waiters(engine)
        caplog.clear()
        caplog.set_level(logging.WARNING)
        await asyncio.wait_for(server.running.stop(grace=0.1), BOUND_SECONDS)
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        await holder.rollback()
    assert await balances(engine, a.id, b.id) == {a.id: Decimal("10.00"), b.id: Decimal("0.00")}
    async with engine.connect() as conn:
        keys = await conn.scalar(
            text("SELECT count(*) FROM idempotency_keys WHERE request_id = :r"),
            {"r": request.request_id},
        )
    assert keys == 0  # nothing of it was kept: the retry applies it once
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_call_whose_deadline_passed_while_queued_is_not_applied(
    account_stub, factory: Factory, engine: AsyncEngine, server: RunningServer
) -> None:
    """Queued behind a batch held on a row lock, a Transfer whose deadline passes before its
    own batch begins is dropped from it: DEADLINE_EXCEEDED, and nothing of it is written."""
    a = await factory.account(balance="10.00")
    b = await factory.account()
    held = await factory.account(balance="1.00")
    late = api.TransferRequest(
        from_account_id=a.id, to_account_id=b.id, amount="2.00", request_id=rid()
    )
    async with engine.connect() as holder:
        await holder.execute(select(Account.id).where(Account.id == held.id).with_for_update())
        blocked = asyncio.ensure_future(
            account_stub.Transfer(
                api.TransferRequest(
                    from_account_id=held.id, to_account_id=b.id, amount="1.00", request_id=rid()
                )
            )
        )
        await wait_for_lock_waiters(engine)
        call = asyncio.ensure_future(account_stub.Transfer(late, timeout=0.5))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call, BOUND_SECONDS)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert server.db is not None and server.db.waiting() >= 2  # still queued, not dropped
        await holder.rollback()
    await asyncio.wait_for(blocked, BOUND_SECONDS)
    await until_waiting_drops(server)
    assert await balances(engine, a.id, b.id) == {a.id: Decimal("10.00"), b.id: Decimal("1.00")}
    async with engine.connect() as conn:
        kept = await conn.scalar(
            text("SELECT count(*) FROM idempotency_keys WHERE request_id = :r"),
            {"r": late.request_id},
        )
    assert kept == 0


async def until_waiting_drops(server: RunningServer) -> None:
    assert server.db is not None
    for _ in range(1000):
        if server.db.waiting() == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{server.db.waiting()} calls still wait on the batches")


async def test_a_money_batch_holds_at_most_a_thousand_postings(
    account_stub, factory: Factory, engine: AsyncEngine, sessions
) -> None:
    """Two BatchTransfer calls of 1000 at once: 2000 postings, each transaction (one
    created_at per batch) holding at most 1000 of them."""
    accounts = [await factory.account(balance="100.00") for _ in range(10)]
    calls = [
        api.BatchTransferRequest(
            requests=[
                api.TransferRequest(
                    from_account_id=accounts[n % 10].id,
                    to_account_id=accounts[(n + 1 + call) % 10].id,
                    amount="0.01",
                    request_id=rid(),
                )
                for n in range(1000)
            ]
        )
        for call in range(2)
    ]
    responses = await asyncio.wait_for(
        asyncio.gather(*(account_stub.BatchTransfer(c) for c in calls)), BOUND_SECONDS
    )
    assert all(r.WhichOneof("result") == "transfer" for resp in responses for r in resp.results)
    async with engine.connect() as conn:
        sizes = (
            await conn.scalars(
                text(
                    "SELECT count(*) FROM transfers WHERE request_id NOT LIKE 'factory-%' "
                    "GROUP BY created_at"
                )
            )
        ).all()
    assert sum(sizes) == 2000
    assert len(sizes) >= 2 and max(sizes) <= 1000
    await assert_ledger_balances(sessions)
