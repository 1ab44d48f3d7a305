"""Money under concurrency over the real channel: no double apply, no deadlock, no lost cent."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from decimal import Decimal

import grpc
from shop.v1 import account_service_pb2 as api
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.models import Account, Transfer
from tests.factories import Factory
from tests.ids import rid
from tests.ledger import assert_ledger_balances, customer_transfers
from tests.rpc import failure_of

# Every test here must end well within this; a deadlock or lost wake-up fails instead of hanging.
BOUND_SECONDS = 30


async def balances(
    sessions: async_sessionmaker[AsyncSession], ids: list[int]
) -> dict[int, Decimal]:
    async with sessions() as session:
        rows = await session.execute(select(Account.id, Account.balance).where(Account.id.in_(ids)))
        return {row.id: row.balance for row in rows}


async def outcome(call) -> tuple[str, object]:
    """("ok", response) or (status code name, reason) for a unary call."""
    try:
        return "ok", await call
    except grpc.aio.AioRpcError as error:
        failure = failure_of(error)
        return failure.code.name, failure.reason


async def test_identical_concurrent_transfers_apply_once(
    account_stub, factory: Factory, sessions
) -> None:
    source = await factory.account(balance="100.00")
    target = await factory.account()
    request = api.TransferRequest(
        from_account_id=source.id, to_account_id=target.id, amount="7.50", request_id=rid()
    )
    answers = await asyncio.wait_for(
        asyncio.gather(*(account_stub.Transfer(request) for _ in range(10))), BOUND_SECONDS
    )
    assert len(answers) == 10
    assert all(answer == answers[0] for answer in answers)
    assert answers[0].amount == "7.50"
    assert await balances(sessions, [source.id, target.id]) == {
        source.id: Decimal("92.50"),
        target.id: Decimal("7.50"),
    }
    async with sessions() as session:
        ids = (
            await session.scalars(
                select(Transfer.id).where(Transfer.request_id == request.request_id)
            )
        ).all()
    assert list(ids) == [answers[0].id]
    await assert_ledger_balances(sessions)


async def test_identical_concurrent_deposits_apply_once(
    account_stub, factory: Factory, sessions
) -> None:
    account = await factory.account(balance="1.00")
    request = api.DepositRequest(account_id=account.id, amount="2.25", request_id=rid())
    answers = await asyncio.wait_for(
        asyncio.gather(*(account_stub.Deposit(request) for _ in range(10))), BOUND_SECONDS
    )
    assert {answer.balance for answer in answers} == {"3.25"}
    assert all(answer == answers[0] for answer in answers)
    assert await balances(sessions, [account.id]) == {account.id: Decimal("3.25")}
    await assert_ledger_balances(sessions)


async def test_opposite_transfers_do_not_deadlock(account_stub, factory: Factory, sessions) -> None:
    a = await factory.account(balance="50.00")
    b = await factory.account(balance="50.00")
    rng = random.Random(1)

    def transfer(source: int, target: int) -> object:
        amount = f"{rng.randint(1, 1500) / 100:.2f}"
        return outcome(
            account_stub.Transfer(
                api.TransferRequest(
                    from_account_id=source, to_account_id=target, amount=amount, request_id=rid()
                )
            )
        )

    calls = []
    for _ in range(40):
        calls.append(transfer(a.id, b.id))
        calls.append(transfer(b.id, a.id))
    results = await asyncio.wait_for(asyncio.gather(*calls), BOUND_SECONDS)

    kinds = Counter(kind for kind, _ in results)
    failures = {(kind, reason) for kind, reason in results if kind != "ok"}
    assert failures <= {("FAILED_PRECONDITION", "INSUFFICIENT_FUNDS")}, failures
    assert kinds["ok"] > 0

    final = await balances(sessions, [a.id, b.id])
    assert sum(final.values()) == Decimal("100.00")
    assert all(balance >= 0 for balance in final.values())

    # The balances are exactly what the applied transfers say.
    applied = [response for kind, response in results if kind == "ok"]
    net_a = sum(
        (Decimal(t.amount) if t.to_account_id == a.id else -Decimal(t.amount) for t in applied),
        Decimal("0"),
    )
    assert final[a.id] == Decimal("50.00") + net_a
    async with sessions() as session:
        stored = await session.scalar(
            select(func.count()).select_from(customer_transfers().subquery())
        )
    assert stored == len(applied)
    await assert_ledger_balances(sessions)


async def test_hot_account_withdrawals(account_stub, factory: Factory, sessions) -> None:
    account = await factory.account(balance="100.00")
    results = await asyncio.wait_for(
        asyncio.gather(
            *(
                outcome(
                    account_stub.Withdraw(
                        api.WithdrawRequest(account_id=account.id, amount="3.00", request_id=rid())
                    )
                )
                for _ in range(50)
            )
        ),
        BOUND_SECONDS,
    )
    succeeded = [response for kind, response in results if kind == "ok"]
    failed = [(kind, reason) for kind, reason in results if kind != "ok"]
    assert len(succeeded) == 33
    assert failed == [("FAILED_PRECONDITION", "INSUFFICIENT_FUNDS")] * 17
    # Each success saw a distinct balance: 97.00, 94.00, ..., 1.00.
    assert sorted(Decimal(r.balance) for r in succeeded) == [Decimal(1 + 3 * n) for n in range(33)]
    assert await balances(sessions, [account.id]) == {account.id: Decimal("1.00")}
    await assert_ledger_balances(sessions)


async def test_small_bank(account_stub, factory: Factory, sessions) -> None:
    accounts = [await factory.account(balance="100.00") for _ in range(8)]
    ids = [a.id for a in accounts]
    total = Decimal("800.00")
    seen: Counter[tuple[str, object]] = Counter()
    succeeded: dict[str, api.TransferRequest] = {}
    answers: dict[str, list[object]] = {}

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(25):
            source, target = rng.sample(ids, 2)
            request = api.TransferRequest(
                from_account_id=source,
                to_account_id=target,
                amount=f"{rng.randint(1, 4000) / 100:.2f}",
                request_id=rid(),
            )
            sends = 2 if rng.random() < 0.3 else 1
            for _ in range(sends):
                kind, response = await outcome(account_stub.Transfer(request))
                seen[(kind, None if kind == "ok" else response)] += 1
                if kind == "ok":
                    succeeded[request.request_id] = request
                    answers.setdefault(request.request_id, []).append(response)

    await asyncio.wait_for(asyncio.gather(*(client(seed) for seed in range(16))), BOUND_SECONDS)

    kinds = {kind for kind, _ in seen}
    assert not kinds & {"INTERNAL", "UNKNOWN", "ABORTED"}, seen
    assert kinds <= {"ok", "FAILED_PRECONDITION"}, seen
    assert seen[("ok", None)] > 0

    final = await balances(sessions, ids)
    assert sum(final.values()) == total
    assert all(balance >= 0 for balance in final.values()), final

    # A re-sent request that succeeded got the very same transfer back every time.
    for request_id, responses in answers.items():
        assert all(r == responses[0] for r in responses), request_id

    async with sessions() as session:
        rows = (await session.scalars(customer_transfers())).all()
    per_request = Counter(row.request_id for row in rows)
    assert all(count == 1 for count in per_request.values())
    assert set(per_request) == set(succeeded)

    # Replaying the stored transfers from the opening balances gives the final balances.
    expected = dict.fromkeys(ids, Decimal("100.00"))
    for row in rows:
        expected[row.from_account_id] -= row.amount
        expected[row.to_account_id] += row.amount
    assert expected == final
    await assert_ledger_balances(sessions)
