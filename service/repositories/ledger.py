"""The double-entry ledger: every balance change is a transfer (the journal) with two entries,
a debit and a credit that sum to zero, and the cached balances move with them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import or_, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from service.db.models import EXTERNAL_INDEX_WHERE, Account, AccountKind, Transfer
from service.db.streaming import Rows, epoch_microseconds, partitions
from service.errors import AlreadyExists, DomainError, FailedPrecondition
from service.repositories.integrity import violated_constraint

BALANCE_NOT_NEGATIVE = "ck_accounts_balance_not_negative"
TRANSFER_REQUEST_ID_UNIQUE = "uq_transfers_request_id"

# The largest balance NUMERIC(18, 2) holds; past it PostgreSQL would fail the UPDATE.
MAX_BALANCE = Decimal("9999999999999999.99")


class Numbered(Protocol):
    """Any account record: an entity, a locked row, a batch's running balance."""

    @property
    def id(self) -> int: ...


def insufficient_funds(account: Numbered, amount: Decimal) -> FailedPrecondition:
    return FailedPrecondition(
        f"account {account.id} has insufficient funds",
        reason="INSUFFICIENT_FUNDS",
        account_id=account.id,
        requested=amount,
    )


def over_limit(account: Numbered, amount: Decimal) -> FailedPrecondition:
    return FailedPrecondition(
        f"account {account.id} cannot hold more than {MAX_BALANCE}",
        reason="BALANCE_LIMIT_EXCEEDED",
        account_id=account.id,
        requested=amount,
    )


@dataclass(frozen=True, slots=True)
class Held:
    """A customer account as locked for a transfer: only what posting needs."""

    id: int
    kind: str
    currency: str
    balance: Decimal


Holder = Account | Held


@dataclass(frozen=True, slots=True)
class Posted:
    """A transfer as posted (the columns of a transfers row)."""

    id: int
    from_account_id: int
    to_account_id: int
    amount: Decimal
    request_id: str
    created_at: datetime


# What StreamTransfers sends of a transfer, in the order accounts_convert.transfer_rows_to_batch
# unpacks it: created_at as epoch microseconds (cheaper to decode and convert than a datetime).
STATEMENT_COLUMNS = (
    Transfer.id,
    Transfer.from_account_id,
    Transfer.to_account_id,
    Transfer.amount,
    Transfer.request_id,
    epoch_microseconds(Transfer.created_at).label("created_at"),
)


# The whole posting in one statement. Data-modifying CTEs all run, in one snapshot, whether or
# not the final SELECT reads them; the audit rows are those the ORM's after_flush hook would
# write for the balance updates (service/db/audit.py).
POST = text(
    """
WITH legs (account_id, amount) AS (
    VALUES (CAST(:source AS BIGINT), -CAST(:amount AS NUMERIC(18, 2))),
           (CAST(:target AS BIGINT), CAST(:amount AS NUMERIC(18, 2)))
), moved AS (
    UPDATE accounts SET balance = accounts.balance + legs.amount, updated_at = now()
    FROM legs
    WHERE accounts.id = legs.account_id AND accounts.kind = 'customer'
    RETURNING accounts.id, accounts.balance, accounts.updated_at
), journal AS (
    INSERT INTO transfers (from_account_id, to_account_id, amount, request_id)
    VALUES (CAST(:source AS BIGINT), CAST(:target AS BIGINT), CAST(:amount AS NUMERIC(18, 2)),
            CAST(:rid AS VARCHAR))
    RETURNING id, created_at
), entries AS (
    INSERT INTO ledger_entries (transfer_id, account_id, amount)
    SELECT journal.id, legs.account_id, legs.amount FROM journal, legs
), audit AS (
    INSERT INTO audit_log (table_name, row_id, action, changes)
    SELECT 'accounts', moved.id, 'update',
           jsonb_build_object('balance', moved.balance::text, 'updated_at', moved.updated_at::text)
    FROM moved
)
SELECT journal.id, journal.created_at, moved.id AS account_id, moved.balance, moved.updated_at
FROM journal LEFT JOIN moved ON true
"""
)


def _cached(account: Holder) -> bool:
    """Whether the account keeps its balance in accounts.balance (customer accounts do)."""
    return account.kind == AccountKind.CUSTOMER


def check_postable(source: Holder, target: Holder, amount: Decimal) -> None:
    """INSUFFICIENT_FUNDS or BALANCE_LIMIT_EXCEEDED before POST would meet the schema's limits
    (the caller holds both customer accounts locked, so their balances are current)."""
    if _cached(source) and source.balance < amount:
        raise insufficient_funds(source, amount)
    if _cached(target) and target.balance + amount > MAX_BALANCE:
        raise over_limit(target, amount)


def posting_error(
    exc: BaseException, source: Holder, amount: Decimal, request_id: str
) -> DomainError | None:
    """What a constraint POST broke means to the client; None for any other error."""
    constraint = violated_constraint(exc)
    if constraint == BALANCE_NOT_NEGATIVE:
        return insufficient_funds(source, amount)
    if constraint == TRANSFER_REQUEST_ID_UNIQUE:
        # Its idempotency key was purged, but the journal keeps every request_id.
        return AlreadyExists(
            f"request_id {request_id} was used for a different request",
            reason="REQUEST_ID_REUSED",
            request_id=request_id,
        )
    return None


def posted(
    rows: Sequence[Any], source: Holder, target: Holder, amount: Decimal, request_id: str
) -> Posted:
    """The transfer POST wrote, from its rows (each carries the journal's id and created_at)."""
    return Posted(
        id=rows[0].id,
        from_account_id=source.id,
        to_account_id=target.id,
        amount=amount,
        request_id=request_id,
        created_at=rows[0].created_at,
    )


class Ledger:
    """Posts transfers and reads an account's statement. The caller has locked the customer
    accounts involved in a posting, in id order. The external account is never locked or
    updated (it caches no balance), so deposits and withdrawals in one currency do not queue
    behind each other."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def external(self, currency: str) -> Account:
        """The currency's external account, created on first use."""
        account = await self._select_external(currency)
        if account is None:
            # Two first deposits may race here: ON CONFLICT lets the loser read the winner's row.
            await self.session.execute(
                pg_insert(Account)
                .values(kind=AccountKind.EXTERNAL.value, user_id=None, currency=currency)
                .on_conflict_do_nothing(
                    index_elements=[Account.currency],
                    # A literal, not a bound parameter: PostgreSQL must match the partial index.
                    index_where=text(EXTERNAL_INDEX_WHERE),
                )
            )
            account = await self._select_external(currency)
        assert account is not None, "the external account exists after the insert"
        return account

    async def _select_external(self, currency: str) -> Account | None:
        return await self.session.scalar(
            select(Account).where(
                Account.kind == AccountKind.EXTERNAL.value, Account.currency == currency
            )
        )

    async def post(
        self, source: Holder, target: Holder, amount: Decimal, request_id: str
    ) -> Posted:
        """Move `amount` from source to target: the transfer row, its two entries, both cached
        balances (and their audit rows) in one statement, so one round trip and all or nothing.
        The schema's CHECK guards the step: should a caller's funds check ever be bypassed, the
        statement fails whole and the client gets INSUFFICIENT_FUNDS, not INTERNAL. ORM accounts
        passed in are given their new balance, as committed state (nothing left to flush)."""
        check_postable(source, target, amount)
        params = {"source": source.id, "target": target.id, "amount": amount, "rid": request_id}
        try:
            # A savepoint guards the balance step (as the seed does): should the schema's CHECK
            # fire, only this step rolls back and the caller still holds a usable transaction.
            async with self.session.begin_nested():
                rows = (await self.session.execute(POST, params)).all()
        except IntegrityError as exc:
            error = posting_error(exc, source, amount, request_id)
            if error is None:
                raise
            raise error from exc
        for row in rows:
            for holder in (source, target):
                if isinstance(holder, Account) and holder.id == row.account_id:
                    set_committed_value(holder, "balance", row.balance)
                    set_committed_value(holder, "updated_at", row.updated_at)
        return posted(rows, source, target, amount, request_id)

    def statement(
        self, account_id: int, *, batch_size: int, after_id: int = 0
    ) -> AsyncIterator[Rows]:
        """The account's transfers, in or out, with id > after_id in id order, as rows of
        STATEMENT_COLUMNS, batch_size per partition, from a server-side cursor (after_id
        resumes an export)."""
        stmt = (
            select(*STATEMENT_COLUMNS)
            .where(
                or_(Transfer.from_account_id == account_id, Transfer.to_account_id == account_id),
                Transfer.id > after_id,
            )
            .order_by(Transfer.id)
        )
        return partitions(self.session, stmt, batch_size)
