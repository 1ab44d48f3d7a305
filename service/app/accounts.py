"""Accounts and money: the unit of work and the rules of AccountService, for any transport.
Every write is idempotent; deposits, withdrawals and transfers go through the group-commit
writer (money_writer.py). Answers are ORM rows, row tuples (GetAccount's coalesced read, the
statement export), or what the caller's Answers build inside the money batch."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, Generic

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from service.app.idempotency import IdempotentRequest, M, idempotent
from service.app.money_rules import Posting
from service.app.money_writer import A, Answers, MoneyWriter
from service.db.coalescer import Outcome
from service.db.database import Database
from service.db.models import Account, Transfer
from service.repositories.accounts import AccountRepository
from service.repositories.ledger import Ledger
from service.repositories.users import UserRepository


class Accounts(Generic[A]):
    """Money accounts, deposits, withdrawals and transfers."""

    def __init__(self, db: Database, answers: Answers[A]) -> None:
        self.db = db
        self._money = MoneyWriter(db, answers)
        # GetAccount: concurrent calls share one statement (WHERE id = ANY(:ids)) per batch.
        self._rows_by_id = db.point_reads(_rows_by_id, name="account read batch")

    async def open(
        self,
        user_id: int,
        currency: str,
        *,
        request: IdempotentRequest,
        answer: Callable[[Account], M],
        parse: Callable[[bytes], M],
    ) -> M:
        """A zero-balance account for a live user, once per request.request_id."""

        async def open_account(session: AsyncSession) -> M:
            await UserRepository(session).get_live(user_id)
            return answer(await AccountRepository(session).add(user_id, currency))

        return await idempotent(
            self.db, method="OpenAccount", request=request, parse=parse, work=open_account
        )

    def row(self, account_id: int) -> Awaitable[Any]:
        """The account's row (repositories.accounts.ACCOUNT_COLUMNS) with its balance."""
        # The coalescer's own awaitable, handed on: no coroutine of this layer on the path.
        return self._rows_by_id.submit(account_id)

    def post(self, method: str, request: IdempotentRequest, posting: Posting) -> Awaitable[A]:
        """Apply one posting in the next money batch, once per request_id."""
        return self._money.post(method, request, posting)

    def post_many(
        self, method: str, requests: Sequence[tuple[IdempotentRequest, Posting]]
    ) -> Awaitable[list[Outcome[A]]]:
        """Apply postings together, each with its own outcome, in order."""
        return self._money.post_many(method, requests)

    async def transfers_page(
        self, account_id: int, *, before_id: int, limit: int
    ) -> Sequence[Transfer]:
        """Up to `limit` of the account's transfers before `before_id`, newest first."""
        async with self.db.read() as session:
            accounts = AccountRepository(session)
            await accounts.get(account_id)
            return await accounts.transfers_page(account_id, before_id=before_id, limit=limit)

    async def statement(
        self, account_id: int, *, batch_size: int, after_id: int
    ) -> AsyncGenerator[Sequence[Any], None]:
        """The account's transfers after `after_id`, oldest first, from one snapshot. Close it
        (aclosing) when the caller stops early: the snapshot ends then."""
        async with self.db.snapshot() as session:
            await AccountRepository(session).get(account_id)
            async for rows in Ledger(session).statement(
                account_id, batch_size=batch_size, after_id=after_id
            ):
                yield rows


async def _rows_by_id(conn: AsyncConnection, ids: Sequence[int]) -> Sequence[Outcome[Any]]:
    return await AccountRepository(conn).rows_by_id(ids)
