"""The ledger's rules, applied to a batch of postings in order against running balances: double
entry, no negative customer balance, no balance past NUMERIC(18, 2), one currency per transfer,
deposits and withdrawals against the currency's external account. Pure: the money writer
(app/money_writer.py) reads the rows it needs and writes what this decides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from service.errors import AlreadyExists, DomainError, FailedPrecondition, NotFound
from service.repositories.ledger import Claims, External, Locked, Writes

# The largest balance NUMERIC(18, 2) holds; past it PostgreSQL would fail the UPDATE.
MAX_BALANCE = Decimal("9999999999999999.99")


class Kind(StrEnum):
    TRANSFER = "transfer"
    DEPOSIT = "deposit"
    WITHDRAW = "withdraw"


@dataclass(frozen=True, slots=True)
class Posting:
    """One balance change asked for: a transfer between two customer accounts (account_id is
    the source, to_account_id the target), or a deposit to / withdrawal from account_id."""

    kind: Kind
    request_id: str
    account_id: int
    amount: Decimal
    to_account_id: int = 0


@dataclass(frozen=True, slots=True)
class Posted:
    """A posting as applied: its transfer row, and the customer account it names as it stood
    right after it (the target for a deposit, the source otherwise)."""

    id: int  # the transfer's
    from_account_id: int
    to_account_id: int
    amount: Decimal
    request_id: str
    created_at: datetime
    account: Locked
    balance_after: Decimal


def insufficient_funds(account: Locked, amount: Decimal) -> FailedPrecondition:
    return FailedPrecondition(
        f"account {account.id} has insufficient funds",
        reason="INSUFFICIENT_FUNDS",
        account_id=account.id,
        requested=amount,
    )


def over_limit(account: Locked, amount: Decimal) -> FailedPrecondition:
    return FailedPrecondition(
        f"account {account.id} cannot hold more than {MAX_BALANCE}",
        reason="BALANCE_LIMIT_EXCEEDED",
        account_id=account.id,
        requested=amount,
    )


Holder = Locked | External


def plan(
    postings: Sequence[Posting],
    claims: Claims,
    accounts: dict[int, Locked],
    externals: dict[str, External],
    writes: Writes,
) -> list[Posted | DomainError]:
    """Each claimed posting's outcome, in order, against running balances; what the applied
    ones write goes to `writes`. The accounts' balances move as postings are applied.
    `postings` is one group-commit batch: at most money.MAX_BATCH (1000), as are the outcomes
    and what goes to `writes`."""
    outcomes: list[Posted | DomainError] = []
    for posting in postings:
        try:
            outcomes.append(_post(posting, claims, accounts, externals, writes))
        except DomainError as error:
            outcomes.append(error)
    return outcomes


def _post(
    posting: Posting,
    claims: Claims,
    accounts: dict[int, Locked],
    externals: dict[str, External],
    writes: Writes,
) -> Posted:
    if posting.request_id in claims.journaled:
        # Its idempotency key was purged, but the journal keeps every request_id.
        raise AlreadyExists.request_id_reused(posting.request_id)
    source, target = _holders(posting, accounts, externals)
    amount = posting.amount
    if isinstance(source, Locked) and source.balance < amount:
        raise insufficient_funds(source, amount)
    if isinstance(target, Locked) and target.balance + amount > MAX_BALANCE:
        raise over_limit(target, amount)
    transfer_id = claims.transfer_ids[posting.request_id]
    writes.transfers.append((transfer_id, source.id, target.id, amount, posting.request_id))
    for holder, delta in ((source, -amount), (target, amount)):
        if isinstance(holder, Locked):
            holder.balance += delta
            writes.balances[holder.id] = holder.balance
    named = target if posting.kind is Kind.DEPOSIT else source
    assert isinstance(named, Locked)
    assert claims.now is not None, "a claimed posting has its transaction's timestamp"
    return Posted(
        transfer_id,
        source.id,
        target.id,
        amount,
        posting.request_id,
        claims.now,
        named,
        named.balance,
    )


def _holders(
    posting: Posting, accounts: dict[int, Locked], externals: dict[str, External]
) -> tuple[Holder, Holder]:
    account = _customer(accounts, posting.account_id)
    if posting.kind is Kind.TRANSFER:
        target = _customer(accounts, posting.to_account_id)
        if account.currency != target.currency:
            raise FailedPrecondition(
                f"accounts {account.id} ({account.currency}) and {target.id} "
                f"({target.currency}) hold different currencies",
                reason="CURRENCY_MISMATCH",
            )
        return account, target
    external = externals[account.currency]
    return (external, account) if posting.kind is Kind.DEPOSIT else (account, external)


def _customer(accounts: dict[int, Locked], account_id: int) -> Locked:
    account = accounts.get(account_id)
    if account is None:
        raise NotFound("account", account_id)
    return account
