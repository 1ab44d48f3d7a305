"""Customer accounts and their pages of transfers: balances change only through the ledger
(repositories/ledger.py), under row locks taken in id order."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import ARRAY, BigInteger, Row, any_, bindparam, or_, select
from sqlalchemy.sql.elements import ColumnElement

from service.db.models import Account, AccountKind, Transfer
from service.errors import NotFound
from service.repositories.handle import Repository

IS_CUSTOMER = Account.kind == AccountKind.CUSTOMER.value

# An account's columns as GetAccount sends them (api/accounts_convert.account_to_proto).
ACCOUNT_COLUMNS = (
    Account.id,
    Account.user_id,
    Account.currency,
    Account.balance,
    Account.created_at,
    Account.updated_at,
)
# GetAccount's statement: the accounts of a batch of coalesced calls, one array parameter.
_ACCOUNT_ROWS_BY_ID = select(*ACCOUNT_COLUMNS).where(
    Account.id == any_(bindparam("ids", type_=ARRAY(BigInteger))), IS_CUSTOMER
)


class AccountRepository(Repository):
    """Customer accounts: open, read, page through their transfers."""

    async def add(self, user_id: int, currency: str) -> Account:
        account = Account(user_id=user_id, currency=currency, balance=Decimal("0.00"))
        self.session.add(account)
        await self.session.flush()
        return account

    async def rows_by_id(
        self, account_ids: Sequence[int]
    ) -> list[Row[*tuple[Any, ...]] | NotFound]:
        """Each id's row of ACCOUNT_COLUMNS, or NotFound, in the order asked (an id may come
        more than once): one statement for them all, on a Core connection. Customer accounts
        only, as get() reads them."""
        found = await self.on.execute(_ACCOUNT_ROWS_BY_ID, {"ids": list(set(account_ids))})
        rows: dict[int, Row[*tuple[Any, ...]]] = {row.id: row for row in found}
        return [rows[i] if i in rows else NotFound("account", i) for i in account_ids]

    async def get(self, account_id: int) -> Account:
        """A customer account: external accounts are not reachable by id (ACCOUNT_NOT_FOUND)."""
        account = await self.session.scalar(
            select(Account).where(Account.id == account_id, IS_CUSTOMER)
        )
        if account is None:
            raise NotFound("account", account_id)
        return account

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
