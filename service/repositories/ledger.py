"""The double-entry ledger: every balance change is a transfer (the journal) with two entries,
a debit and a credit that sum to zero, and the cached balances move with them."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import insert, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import EXTERNAL_INDEX_WHERE, Account, AccountKind, LedgerEntry, Transfer
from service.errors import AlreadyExists, FailedPrecondition
from service.repositories.integrity import violated_constraint

BALANCE_NOT_NEGATIVE = "ck_accounts_balance_not_negative"
TRANSFER_REQUEST_ID_UNIQUE = "uq_transfers_request_id"

# The largest balance NUMERIC(18, 2) holds; past it PostgreSQL would fail the UPDATE.
MAX_BALANCE = Decimal("9999999999999999.99")


def insufficient_funds(account: Account, amount: Decimal) -> FailedPrecondition:
    return FailedPrecondition(
        f"account {account.id} has insufficient funds",
        reason="INSUFFICIENT_FUNDS",
        account_id=account.id,
        requested=amount,
    )


def over_limit(account: Account, amount: Decimal) -> FailedPrecondition:
    return FailedPrecondition(
        f"account {account.id} cannot hold more than {MAX_BALANCE}",
        reason="BALANCE_LIMIT_EXCEEDED",
        account_id=account.id,
        requested=amount,
    )


def _cached(account: Account) -> bool:
    """Whether the account keeps its balance in accounts.balance (customer accounts do)."""
    return account.kind == AccountKind.CUSTOMER


class Ledger:
    """Posts transfers. The caller has locked the customer accounts involved, in id order. The
    external account is never locked or updated (it caches no balance), so deposits and
    withdrawals in one currency do not queue behind each other."""

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
        self, source: Account, target: Account, amount: Decimal, request_id: str
    ) -> Transfer:
        """Move `amount` from source to target: the transfer row, its two entries and both
        cached balances, in one savepoint. The schema's CHECK guards the step: should a caller's
        funds check ever be bypassed, only this step rolls back and the client gets
        INSUFFICIENT_FUNDS, not an aborted transaction and INTERNAL."""
        if _cached(source) and source.balance < amount:
            raise insufficient_funds(source, amount)
        if _cached(target) and target.balance + amount > MAX_BALANCE:
            raise over_limit(target, amount)
        transfer = Transfer(
            from_account_id=source.id, to_account_id=target.id, amount=amount, request_id=request_id
        )
        try:
            async with self.session.begin_nested():
                if _cached(source):
                    source.balance -= amount
                if _cached(target):
                    target.balance += amount
                self.session.add(transfer)
                await self.session.flush()
                await self.session.execute(
                    insert(LedgerEntry),
                    [
                        {"transfer_id": transfer.id, "account_id": source.id, "amount": -amount},
                        {"transfer_id": transfer.id, "account_id": target.id, "amount": amount},
                    ],
                )
        except IntegrityError as exc:
            constraint = violated_constraint(exc)
            if constraint == BALANCE_NOT_NEGATIVE:
                raise insufficient_funds(source, amount) from exc
            if constraint == TRANSFER_REQUEST_ID_UNIQUE:
                # Its idempotency key was purged, but the journal keeps every request_id.
                raise AlreadyExists(
                    f"request_id {request_id} was used for a different request",
                    reason="REQUEST_ID_REUSED",
                    request_id=request_id,
                ) from exc
            raise
        return transfer
