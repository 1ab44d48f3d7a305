"""Customer accounts and their statements: balances change only under row locks taken in id
order, and only through the ledger (repositories/ledger.py)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from sqlalchemy import BigInteger, any_, bindparam, or_, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from service.db.models import Account, AccountKind, Transfer
from service.errors import FailedPrecondition, NotFound
from service.repositories.ledger import Held, Ledger, Posted

IS_CUSTOMER = Account.kind == AccountKind.CUSTOMER.value

ACCOUNTS = Account.__table__
# Built once (see lock_held); on the table, so the ORM adds nothing to the execution.
LOCK_HELD = (
    select(ACCOUNTS.c.id, ACCOUNTS.c.kind, ACCOUNTS.c.currency, ACCOUNTS.c.balance)
    .where(
        ACCOUNTS.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger))),
        ACCOUNTS.c.kind == AccountKind.CUSTOMER.value,
    )
    .order_by(ACCOUNTS.c.id)
    .with_for_update()
)


class AccountRepository:
    """Customer accounts: open, read, lock, and move money through the ledger."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, user_id: int, currency: str) -> Account:
        account = Account(user_id=user_id, currency=currency, balance=Decimal("0.00"))
        self.session.add(account)
        await self.session.flush()
        return account

    async def get(self, account_id: int) -> Account:
        """A customer account: external accounts are not reachable by id (ACCOUNT_NOT_FOUND)."""
        account = await self.session.scalar(
            select(Account).where(Account.id == account_id, IS_CUSTOMER)
        )
        if account is None:
            raise NotFound("account", account_id)
        return account

    async def lock(self, *account_ids: int) -> dict[int, Account]:
        """Customer accounts, SELECT ... FOR UPDATE in ascending id order, so A->B and B->A
        cannot deadlock."""
        rows = await self.session.scalars(
            select(Account)
            .where(Account.id.in_(account_ids), IS_CUSTOMER)
            .order_by(Account.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        accounts = {a.id: a for a in rows}
        for account_id in account_ids:
            if account_id not in accounts:
                raise NotFound("account", account_id)
        return accounts

    async def deposit(self, account_id: int, amount: Decimal, request_id: str) -> Account:
        """A transfer from the currency's external account."""
        account = (await self.lock(account_id))[account_id]
        ledger = Ledger(self.session)
        external = await ledger.external(account.currency)
        await ledger.post(external, account, amount, request_id)
        return account

    async def withdraw(self, account_id: int, amount: Decimal, request_id: str) -> Account:
        """A transfer to the currency's external account."""
        account = (await self.lock(account_id))[account_id]
        ledger = Ledger(self.session)
        external = await ledger.external(account.currency)
        await ledger.post(account, external, amount, request_id)
        return account

    async def lock_held(self, *account_ids: int) -> dict[int, Held]:
        """lock() for posting alone: the same rows and order, only the columns the ledger needs,
        as plain values (no ORM identity map, no instances to track)."""
        rows = await self.session.execute(LOCK_HELD, {"ids": list(account_ids)})
        accounts = {row.id: Held(row.id, row.kind, row.currency, row.balance) for row in rows}
        for account_id in account_ids:
            if account_id not in accounts:
                raise NotFound("account", account_id)
        return accounts

    async def transfer(self, from_id: int, to_id: int, amount: Decimal, request_id: str) -> Posted:
        accounts = await self.lock_held(from_id, to_id)
        source, target = accounts[from_id], accounts[to_id]
        if source.currency != target.currency:
            raise FailedPrecondition(
                f"accounts {from_id} ({source.currency}) and {to_id} ({target.currency}) "
                "hold different currencies",
                reason="CURRENCY_MISMATCH",
            )
        return await Ledger(self.session).post(source, target, amount, request_id)

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
