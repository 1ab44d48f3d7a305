"""Checks of the double-entry ledger, read straight from the database."""

from __future__ import annotations

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from service.db.models import Account, AccountKind, LedgerEntry, Transfer


async def assert_ledger_balances(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Every customer account's cached balance is the sum of its entries (external accounts
    cache nothing: 0); every transfer has exactly a debit on its source and a credit on its
    target, summing to zero; so in each currency the customers hold exactly what the external
    account's entries say came in from outside."""
    async with sessions() as session, session.begin():
        sums = (
            select(LedgerEntry.account_id, func.sum(LedgerEntry.amount).label("total"))
            .group_by(LedgerEntry.account_id)
            .subquery()
        )
        mismatched = (
            await session.execute(
                select(Account.id, Account.balance, sums.c.total)
                .outerjoin(sums, sums.c.account_id == Account.id)
                .where(
                    Account.kind == AccountKind.CUSTOMER,
                    Account.balance != func.coalesce(sums.c.total, 0),
                )
            )
        ).all()
        assert mismatched == [], f"balance != sum(entries): {mismatched}"
        cached_external = await session.scalar(
            select(func.count()).where(Account.kind == AccountKind.EXTERNAL, Account.balance != 0)
        )
        assert cached_external == 0

        debit, credit = aliased(LedgerEntry), aliased(LedgerEntry)
        unbalanced = (
            await session.execute(
                select(Transfer.id)
                .outerjoin(
                    debit,
                    (debit.transfer_id == Transfer.id)
                    & (debit.account_id == Transfer.from_account_id)
                    & (debit.amount == -Transfer.amount),
                )
                .outerjoin(
                    credit,
                    (credit.transfer_id == Transfer.id)
                    & (credit.account_id == Transfer.to_account_id)
                    & (credit.amount == Transfer.amount),
                )
                .where((debit.id.is_(None)) | (credit.id.is_(None)))
            )
        ).all()
        assert unbalanced == [], f"transfers without their two legs: {unbalanced}"
        legs = await session.scalar(select(func.count()).select_from(LedgerEntry))
        transfers = await session.scalar(select(func.count()).select_from(Transfer))
        assert legs == 2 * (transfers or 0)

        held = dict(
            (
                await session.execute(
                    select(Account.currency, func.sum(Account.balance))
                    .where(Account.kind == AccountKind.CUSTOMER)
                    .group_by(Account.currency)
                )
            ).all()
        )
        came_in = dict(
            (
                await session.execute(
                    select(Account.currency, -func.sum(LedgerEntry.amount))
                    .join(LedgerEntry, LedgerEntry.account_id == Account.id)
                    .where(Account.kind == AccountKind.EXTERNAL)
                    .group_by(Account.currency)
                )
            ).all()
        )
        assert {c: t for c, t in held.items() if t} == {c: t for c, t in came_in.items() if t}


def customer_transfers() -> Select[tuple[Transfer]]:
    """Transfers between two customer accounts (deposits and withdrawals left out)."""
    source, target = aliased(Account), aliased(Account)
    return (
        select(Transfer)
        .join(source, source.id == Transfer.from_account_id)
        .join(target, target.id == Transfer.to_account_id)
        .where(source.kind == AccountKind.CUSTOMER, target.kind == AccountKind.CUSTOMER)
    )
