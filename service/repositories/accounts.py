"""Accounts and transfers: balances change only under row locks taken in id order."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import Row, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from service.db.models import Account, Transfer
from service.errors import FailedPrecondition, NotFound
from service.repositories.integrity import violated_constraint

BALANCE_NOT_NEGATIVE = "ck_accounts_balance_not_negative"

TRANSFER_COLUMNS = (
    Transfer.id,
    Transfer.from_account_id,
    Transfer.to_account_id,
    Transfer.amount,
    Transfer.request_id,
    Transfer.created_at,
)


# The largest balance NUMERIC(18, 2) holds; past it PostgreSQL would fail the UPDATE.
MAX_BALANCE = Decimal("9999999999999999.99")


def _over_limit(account: Account, amount: Decimal) -> FailedPrecondition:
    return FailedPrecondition(
        f"account {account.id} cannot hold more than {MAX_BALANCE}",
        reason="BALANCE_LIMIT_EXCEEDED",
        account_id=account.id,
        requested=amount,
    )


def _insufficient(account: Account, amount: Decimal) -> FailedPrecondition:
    return FailedPrecondition(
        f"account {account.id} has insufficient funds",
        reason="INSUFFICIENT_FUNDS",
        account_id=account.id,
        requested=amount,
    )


class AccountRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, user_id: int, currency: str) -> Account:
        account = Account(user_id=user_id, currency=currency, balance=Decimal("0.00"))
        self.session.add(account)
        await self.session.flush()
        return account

    async def get(self, account_id: int) -> Account:
        account = await self.session.get(Account, account_id)
        if account is None:
            raise NotFound("account", account_id)
        return account

    async def lock(self, *account_ids: int) -> dict[int, Account]:
        """SELECT ... FOR UPDATE in ascending id order, so A->B and B->A cannot deadlock."""
        rows = await self.session.scalars(
            select(Account)
            .where(Account.id.in_(account_ids))
            .order_by(Account.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        accounts = {a.id: a for a in rows}
        for account_id in account_ids:
            if account_id not in accounts:
                raise NotFound("account", account_id)
        return accounts

    async def deposit(self, account_id: int, amount: Decimal) -> Account:
        account = (await self.lock(account_id))[account_id]
        if account.balance + amount > MAX_BALANCE:
            raise _over_limit(account, amount)
        account.balance += amount
        await self.session.flush()
        return account

    async def withdraw(self, account_id: int, amount: Decimal) -> Account:
        account = (await self.lock(account_id))[account_id]
        if account.balance < amount:
            raise _insufficient(account, amount)
        account.balance -= amount
        await self.session.flush()
        return account

    async def transfer(
        self, from_id: int, to_id: int, amount: Decimal, request_id: str
    ) -> Transfer:
        accounts = await self.lock(from_id, to_id)
        source, target = accounts[from_id], accounts[to_id]
        if source.currency != target.currency:
            raise FailedPrecondition(
                f"accounts {from_id} ({source.currency}) and {to_id} ({target.currency}) "
                "hold different currencies",
                reason="CURRENCY_MISMATCH",
            )
        if source.balance < amount:
            raise _insufficient(source, amount)
        if target.balance + amount > MAX_BALANCE:
            raise _over_limit(target, amount)
        transfer = Transfer(
            from_account_id=from_id, to_account_id=to_id, amount=amount, request_id=request_id
        )
        # The balance step runs in a savepoint that the schema's CHECK guards: should the check
        # above ever be bypassed, only this step rolls back and the caller gets a domain error
        # (INSUFFICIENT_FUNDS), not an aborted transaction and INTERNAL.
        try:
            async with self.session.begin_nested():
                source.balance -= amount
                target.balance += amount
                self.session.add(transfer)
        except IntegrityError as exc:
            if violated_constraint(exc) == BALANCE_NOT_NEGATIVE:
                raise _insufficient(source, amount) from exc
            raise
        return transfer

    async def transfers_page(
        self, account_id: int, *, before_id: int, limit: int
    ) -> Sequence[Transfer]:
        """The account's transfers, in or out, with id < before_id, descending."""
        stmt = (
            select(Transfer)
            .where(self._touches(account_id), Transfer.id < before_id)
            .order_by(Transfer.id.desc())
            .limit(limit)
        )
        return (await self.session.scalars(stmt)).all()

    @staticmethod
    def _touches(account_id: int) -> ColumnElement[bool]:
        return or_(Transfer.from_account_id == account_id, Transfer.to_account_id == account_id)

    async def stream_transfers(
        self, account_id: int, *, batch_size: int
    ) -> AsyncIterator[Sequence[Row[*tuple[Any, ...]]]]:
        stmt = (
            select(*TRANSFER_COLUMNS)
            .where(self._touches(account_id))
            .order_by(Transfer.id)
            .execution_options(yield_per=batch_size)
        )
        result = await self.session.stream(stmt)
        try:
            async for partition in result.partitions():
                yield partition
        finally:
            await result.close()
