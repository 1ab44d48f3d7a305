"""The double-entry ledger: a journal row, debit and credit, for every balance change, external
accounts kept out of reach, and a journal the database itself refuses to change."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import grpc
import pytest
from shop.v1 import account_service_pb2 as api
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.models import Account, AccountKind, IdempotencyKey, Transfer
from tests.factories import Factory
from tests.ids import rid
from tests.ledger import assert_ledger_balances
from tests.rpc import rpc_fails


async def external_accounts(sessions: async_sessionmaker[AsyncSession]) -> list[Account]:
    async with sessions() as session:
        return list(
            (
                await session.scalars(
                    select(Account).where(Account.kind == AccountKind.EXTERNAL).order_by(Account.id)
                )
            ).all()
        )


async def entries_of(
    sessions: async_sessionmaker[AsyncSession], transfer_id: int
) -> dict[int, Decimal]:
    """The transfer's two legs, as its journal row states them: its source debited, its target
    credited (since issue 22 the row is the only record of them)."""
    async with sessions() as session:
        transfer = await session.get_one(Transfer, transfer_id)
        return {transfer.from_account_id: -transfer.amount, transfer.to_account_id: transfer.amount}


async def journal_row(sessions: async_sessionmaker[AsyncSession], request_id: str) -> Transfer:
    async with sessions() as session:
        row = await session.scalar(select(Transfer).where(Transfer.request_id == request_id))
    assert row is not None
    return row


async def test_deposit_and_withdraw_post_against_the_external_account(
    account_stub, factory: Factory, sessions
) -> None:
    account = await factory.account(currency="CHF")
    deposit_id, withdraw_id = rid(), rid()
    await account_stub.Deposit(
        api.DepositRequest(account_id=account.id, amount="25.00", request_id=deposit_id)
    )
    await account_stub.Withdraw(
        api.WithdrawRequest(account_id=account.id, amount="5.50", request_id=withdraw_id)
    )
    [external] = await external_accounts(sessions)
    assert (external.currency, external.user_id, external.balance) == ("CHF", None, Decimal(0))

    deposit = await journal_row(sessions, deposit_id)
    assert (deposit.from_account_id, deposit.to_account_id) == (external.id, account.id)
    assert await entries_of(sessions, deposit.id) == {
        external.id: Decimal("-25.00"),
        account.id: Decimal("25.00"),
    }
    withdrawal = await journal_row(sessions, withdraw_id)
    assert (withdrawal.from_account_id, withdrawal.to_account_id) == (account.id, external.id)
    assert await entries_of(sessions, withdrawal.id) == {
        account.id: Decimal("-5.50"),
        external.id: Decimal("5.50"),
    }
    await assert_ledger_balances(sessions)


async def test_a_transfer_writes_a_debit_and_a_credit(
    account_stub, factory: Factory, sessions
) -> None:
    a, b = await factory.account(balance="3.00"), await factory.account()
    done = await account_stub.Transfer(
        api.TransferRequest(
            from_account_id=a.id, to_account_id=b.id, amount="1.25", request_id=rid()
        )
    )
    assert await entries_of(sessions, done.id) == {a.id: Decimal("-1.25"), b.id: Decimal("1.25")}
    await assert_ledger_balances(sessions)


async def test_one_external_account_per_currency_even_for_racing_first_deposits(
    account_stub, factory: Factory, sessions
) -> None:
    accounts = [await factory.account(currency=c) for c in ("JPY", "JPY", "JPY", "SEK", "SEK")]
    await asyncio.gather(
        *(
            account_stub.Deposit(
                api.DepositRequest(account_id=account.id, amount="1.00", request_id=rid())
            )
            for account in accounts
        )
    )
    assert sorted(a.currency for a in await external_accounts(sessions)) == ["JPY", "SEK"]
    await assert_ledger_balances(sessions)


async def test_external_accounts_are_not_reachable_as_customer_accounts(
    account_stub, factory: Factory, sessions
) -> None:
    customer = await factory.account(balance="10.00")
    [external] = await external_accounts(sessions)
    calls = [
        account_stub.GetAccount(api.GetAccountRequest(id=external.id)),
        account_stub.Deposit(
            api.DepositRequest(account_id=external.id, amount="1.00", request_id=rid())
        ),
        account_stub.Withdraw(
            api.WithdrawRequest(account_id=external.id, amount="1.00", request_id=rid())
        ),
        account_stub.Transfer(
            api.TransferRequest(
                from_account_id=external.id,
                to_account_id=customer.id,
                amount="1.00",
                request_id=rid(),
            )
        ),
        account_stub.Transfer(
            api.TransferRequest(
                from_account_id=customer.id,
                to_account_id=external.id,
                amount="1.00",
                request_id=rid(),
            )
        ),
        account_stub.ListTransfers(api.ListTransfersRequest(account_id=external.id)),
    ]
    for call in calls:
        failure = await rpc_fails(call)
        assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
        assert failure.metadata == {"id": str(external.id)}
    await assert_ledger_balances(sessions)


async def test_the_journal_refuses_update_and_delete(
    account_stub, factory: Factory, sessions
) -> None:
    model = Transfer
    await factory.account(balance="10.00")
    statements = [
        update(model).values(amount=Decimal("999.00")),
        update(model).values(created_at=text("now()")),
        delete(model),
    ]
    for statement in statements:
        async with sessions() as session:
            with pytest.raises(DBAPIError, match="rows are immutable"):
                async with session.begin():
                    await session.execute(statement)
    async with sessions() as session:
        amounts = (await session.scalars(select(model.amount))).all()
    assert amounts == [Decimal("10.00")]
    await assert_ledger_balances(sessions)


async def test_request_id_reused_after_its_key_was_purged(
    account_stub, factory: Factory, sessions
) -> None:
    """The journal remembers every request_id, so once the idempotency key is purged a reuse
    is still refused, as REQUEST_ID_REUSED rather than INTERNAL."""
    a, b = await factory.account(balance="10.00"), await factory.account()
    request_id = rid()
    await account_stub.Transfer(
        api.TransferRequest(
            from_account_id=a.id, to_account_id=b.id, amount="1.00", request_id=request_id
        )
    )
    async with sessions() as session, session.begin():
        await session.execute(delete(IdempotencyKey))
    failure = await rpc_fails(
        account_stub.Deposit(
            api.DepositRequest(account_id=a.id, amount="2.00", request_id=request_id)
        )
    )
    assert (failure.code, failure.reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    await assert_ledger_balances(sessions)
    async with sessions() as session:
        assert await session.scalar(select(Account.balance).where(Account.id == a.id)) == Decimal(
            "9.00"
        )
