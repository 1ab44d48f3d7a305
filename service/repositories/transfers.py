"""Transfer's unit of work on the pooled connection's driver (service/db/driver.py): both
customer accounts locked in id order, then the posting in a savepoint. The same statements and
rules as Ledger.post on a session (repositories/ledger.py), which deposits and withdrawals use."""

from __future__ import annotations

from decimal import Decimal

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import BigInteger, any_, bindparam, select
from sqlalchemy.dialects.postgresql import ARRAY

from service.db.models import Account, AccountKind
from service.db.raw import Statement
from service.errors import FailedPrecondition, NotFound
from service.repositories.ledger import (
    POST,
    Held,
    Posted,
    check_postable,
    posted,
    posting_error,
)

ACCOUNTS = Account.__table__
# The customer accounts a transfer names, only the columns posting needs, SELECT ... FOR UPDATE
# in ascending id order: A->B and B->A lock in the same order and cannot deadlock.
LOCK_HELD = (
    select(ACCOUNTS.c.id, ACCOUNTS.c.kind, ACCOUNTS.c.currency, ACCOUNTS.c.balance)
    .where(
        ACCOUNTS.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger))),
        ACCOUNTS.c.kind == AccountKind.CUSTOMER.value,
    )
    .order_by(ACCOUNTS.c.id)
    .with_for_update()
)
_LOCK_HELD = Statement.compile(LOCK_HELD)
_POST = Statement.compile(POST)


class Transfers:
    """Moves money between two customer accounts, inside the caller's transaction."""

    def __init__(self, driver: asyncpg.Connection) -> None:
        self.driver = driver

    async def transfer(self, from_id: int, to_id: int, amount: Decimal, request_id: str) -> Posted:
        accounts = await self.lock_held(from_id, to_id)
        source, target = accounts[from_id], accounts[to_id]
        if source.currency != target.currency:
            raise FailedPrecondition(
                f"accounts {from_id} ({source.currency}) and {to_id} ({target.currency}) "
                "hold different currencies",
                reason="CURRENCY_MISMATCH",
            )
        return await self.post(source, target, amount, request_id)

    async def lock_held(self, *account_ids: int) -> dict[int, Held]:
        rows = await _LOCK_HELD.fetch(self.driver, ids=list(account_ids))
        accounts = {row.id: Held(row.id, row.kind, row.currency, row.balance) for row in rows}
        for account_id in account_ids:
            if account_id not in accounts:
                raise NotFound("account", account_id)
        return accounts

    async def post(self, source: Held, target: Held, amount: Decimal, request_id: str) -> Posted:
        """Ledger.post's statement, in a savepoint that guards the balance step: should the
        schema's CHECK fire, only this step rolls back (and the client gets INSUFFICIENT_FUNDS,
        not INTERNAL)."""
        check_postable(source, target, amount)
        try:
            async with self.driver.transaction():  # nested: SAVEPOINT ... RELEASE
                rows = await _POST.fetch(
                    self.driver,
                    source=source.id,
                    target=target.id,
                    amount=amount,
                    rid=request_id,
                )
        except asyncpg.IntegrityConstraintViolationError as exc:
            error = posting_error(exc, source, amount, request_id)
            if error is None:
                raise
            raise error from exc
        return posted(rows, source, target, amount, request_id)
