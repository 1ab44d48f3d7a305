"""Checks of the double-entry ledger, read straight from the database."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from sqlalchemy import Select, func, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from service.db.models import Account, AccountKind, LedgerEntry, Transfer


def transfer_sums(account_ids: Sequence[int] | None = None) -> Select[tuple[int, Decimal]]:
    """Per account, what the journal moved: the amounts of its transfers in minus those of its
    transfers out (each transfer's two legs, read from the row itself), for `account_ids` or
    every account."""
    moved_in = select(Transfer.to_account_id.label("account_id"), Transfer.amount)
    moved_out = select(Transfer.from_account_id.label("account_id"), -Transfer.amount)
    if account_ids is not None:
        moved_in = moved_in.where(Transfer.to_account_id.in_(account_ids))
        moved_out = moved_out.where(Transfer.from_account_id.in_(account_ids))
    legs = union_all(moved_in, moved_out).subquery()
    return select(legs.c.account_id, func.sum(legs.c.amount).label("total")).group_by(
        legs.c.account_id
    )


async def assert_ledger_balances(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Every customer account's cached balance is what its transfers brought in minus what
    they took out (external accounts cache nothing: 0); every transfer moves money between two
    accounts of one currency; so in each currency the customers hold exactly what came in from
    outside (the external account's transfers out minus its transfers in). And no build writes
    ledger_entries any more (issue 22): the legs are the transfer rows."""
    async with sessions() as session, session.begin():
        sums = transfer_sums().subquery()
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
        assert mismatched == [], f"balance != transfers in - transfers out: {mismatched}"
        cached_external = await session.scalar(
            select(func.count()).where(Account.kind == AccountKind.EXTERNAL, Account.balance != 0)
        )
        assert cached_external == 0

        source, target = aliased(Account), aliased(Account)
        across = (
            await session.execute(
                select(Transfer.id)
                .join(source, source.id == Transfer.from_account_id)
                .join(target, target.id == Transfer.to_account_id)
                .where(source.currency != target.currency)
            )
        ).all()
        assert across == [], f"transfers between currencies: {across}"
        legs = await session.scalar(select(func.count()).select_from(LedgerEntry))
        assert legs == 0, "ledger_entries written"

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
                    select(Account.currency, -func.sum(sums.c.total))
                    .join(sums, sums.c.account_id == Account.id)
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
