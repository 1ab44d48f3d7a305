"""The double-entry ledger: every balance change is a transfer (the journal), a debit of its
source and a credit of its target by the same amount, and the cached balances move with them.
The legs are the transfer row itself (from_account_id, to_account_id, amount): an account's
balance is what its transfers brought in minus what they took out. Since issue 22 no
ledger_entries rows are written (nothing read them; see docs/money.md).

Postings are written a batch at a time (app/money_writer.py): per batch, whatever its size, the
customer accounts locked (one SELECT ... FOR UPDATE in id order), the claims read (one SELECT of
the idempotency keys that exist, which also draws the transfer ids of the others), and one
statement that writes everything (balances, journal, and each applied posting's idempotency key
with its response, inserted once). SQLAlchemy's per-statement cost (~0.5 ms of CPU) is paid
three times per batch instead of eight times per transfer. The external account of a currency
caches no balance and is never locked, so deposits in one currency do not queue behind each
other.

A request_id is claimed by inserting its key in the writing statement, not before: a key
inserted at the start and updated with the response at the end was two row versions and four
index entries per posting (issue 22). Two transactions that post the same request_id meet
there: PostgreSQL makes the second INSERT wait for the first transaction, then refuses it if
that one committed (ConcurrentClaim: the whole batch runs again and finds the key) or lets it
through if that one rolled back. A repeat of the same posting meets the first sooner, at its
accounts' locks, which is why the locks come before the claims are read: it then reads the
committed key and is answered from it. A posting refused (INSUFFICIENT_FUNDS...) leaves no key.

No audit rows: the change log (alembic 0007) records every balance and transfer a batch
writes, one changes row per statement, in the same transaction (docs/money.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from sqlalchemy import or_, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from service.db.errors import ConcurrentClaim, violated_constraint
from service.db.models import EXTERNAL_INDEX_WHERE, Account, AccountKind, Transfer
from service.db.streaming import Rows, epoch_microseconds, partitions
from service.repositories.idempotency import StoredRequest

# The unique keys two transactions posting one request_id meet on: its idempotency key, and
# the journal's request_id (where the key was purged).
CLAIM_CONSTRAINTS = frozenset({"pk_idempotency_keys", "uq_transfers_request_id"})

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


@dataclass(frozen=True, slots=True)
class Claims:
    """What reading a batch's request_ids found: those with no key yet (with a transfer id
    drawn for each), of those the ones the journal already holds (their key was purged), the
    keys that exist (a repeat is answered from its key), and the transaction's timestamp
    (every row it writes carries it)."""

    transfer_ids: dict[str, int]
    journaled: frozenset[str]
    stored: dict[str, StoredRequest]
    now: datetime | None


@dataclass(slots=True)
class Locked:
    """A customer account held FOR UPDATE; balance is the running balance within the batch."""

    id: int
    user_id: int
    currency: str
    balance: Decimal
    created_at: datetime
    kind: str = AccountKind.CUSTOMER.value


@dataclass(frozen=True, slots=True)
class External:
    id: int
    currency: str
    kind: str = AccountKind.EXTERNAL.value
    balance: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class Answered:
    """A posting applied: its key as it is stored, with the request's hash and the answer."""

    request_id: str
    request_hash: bytes
    response: bytes


@dataclass
class Writes:
    """Everything a batch writes, as columns (each becomes one array parameter)."""

    transfers: list[tuple[int, int, int, Decimal, str]] = field(default_factory=list)
    balances: dict[int, Decimal] = field(default_factory=dict)


# The keys that exist; a transfer id drawn for each request_id that has none (a volatile
# function in a CASE branch runs only when the branch is taken).
CLAIM = text(
    """
SELECT asked.request_id, keys.request_hash, keys.response,
       CASE WHEN keys.request_id IS NULL
           THEN nextval(pg_get_serial_sequence('transfers', 'id')) END AS transfer_id,
       keys.request_id IS NULL AND EXISTS (
           SELECT FROM transfers WHERE transfers.request_id = asked.request_id
       ) AS journaled,
       now() AS now
FROM unnest(CAST(:request_ids AS varchar[])) AS asked (request_id)
LEFT JOIN idempotency_keys AS keys ON keys.request_id = asked.request_id
"""
)
LOCK = text(
    "SELECT id, user_id, currency, balance, created_at FROM accounts "
    "WHERE id = ANY(CAST(:ids AS bigint[])) AND kind = 'customer' ORDER BY id FOR UPDATE"
)
EXTERNALS = text(
    "SELECT id, currency FROM accounts "
    "WHERE kind = 'external' AND currency = ANY(CAST(:currencies AS varchar[]))"
)
# Data-modifying CTEs all run, in one snapshot, whether or not the final SELECT reads them. The
# journal's foreign keys are checked at the end of the statement, when the transfers exist.
APPLY = text(
    """
WITH moved AS (
    UPDATE accounts SET balance = after.balance, updated_at = now()
    FROM unnest(CAST(:account_ids AS bigint[]), CAST(:balances AS numeric(18, 2)[]))
        AS after (id, balance)
    WHERE accounts.id = after.id
), journal AS (
    INSERT INTO transfers (id, from_account_id, to_account_id, amount, request_id)
    SELECT * FROM unnest(CAST(:transfer_ids AS bigint[]), CAST(:from_ids AS bigint[]),
        CAST(:to_ids AS bigint[]), CAST(:amounts AS numeric(18, 2)[]),
        CAST(:transfer_request_ids AS varchar[]))
), claimed AS (
    INSERT INTO idempotency_keys (request_id, request_hash, response)
    SELECT * FROM unnest(CAST(:answered_ids AS varchar[]), CAST(:hashes AS bytea[]),
        CAST(:responses AS bytea[])) AS answered (request_id, request_hash, response)
    ORDER BY 1
)
SELECT 1
"""
)


def _apply_params(writes: Writes, answered: Sequence[Answered]) -> dict[str, object]:
    return {
        "account_ids": list(writes.balances),
        "balances": list(writes.balances.values()),
        "transfer_ids": [t[0] for t in writes.transfers],
        "from_ids": [t[1] for t in writes.transfers],
        "to_ids": [t[2] for t in writes.transfers],
        "amounts": [t[3] for t in writes.transfers],
        "transfer_request_ids": [t[4] for t in writes.transfers],
        "answered_ids": [a.request_id for a in answered],
        "hashes": [a.request_hash for a in answered],
        "responses": [a.response for a in answered],
    }


class Ledger:
    """The journal and the cached balances: postings a batch at a time, and an
    account's statement. Runs on the caller's transaction, a session's or a Core connection's
    (both execute Core statements alike)."""

    def __init__(self, conn: AsyncConnection | AsyncSession) -> None:
        self.conn = conn

    async def claim(self, request_ids: Sequence[str]) -> Claims:
        """Read the keys of `request_ids` (distinct) and draw a transfer id for each one that
        has none. Nothing is written: apply() inserts the keys of the postings applied."""
        result = await self.conn.execute(CLAIM, {"request_ids": list(request_ids)})
        rows = result.all()
        return Claims(
            transfer_ids={r.request_id: r.transfer_id for r in rows if r.transfer_id is not None},
            journaled=frozenset(row.request_id for row in rows if row.journaled),
            stored={
                r.request_id: StoredRequest(r.request_hash, r.response)
                for r in rows
                if r.transfer_id is None
            },
            now=rows[0].now if rows else None,
        )

    async def lock(self, account_ids: Sequence[int]) -> dict[int, Locked]:
        """The customer accounts among `account_ids`, locked in ascending id order (so batches
        that share accounts lock them in the same order and cannot deadlock)."""
        result = await self.conn.execute(LOCK, {"ids": sorted(set(account_ids))})
        return {
            row.id: Locked(row.id, row.user_id, row.currency, row.balance, row.created_at)
            for row in result
        }

    async def externals(self, currencies: set[str]) -> dict[str, External]:
        """Each currency's external account, created on first use."""
        found = await self._externals(currencies)
        missing = currencies - found.keys()
        if missing:
            # Two first deposits may race here: ON CONFLICT lets the loser read the winner's row.
            await self.conn.execute(
                pg_insert(Account)
                .values([{"kind": AccountKind.EXTERNAL.value, "currency": c} for c in missing])
                .on_conflict_do_nothing(
                    index_elements=[Account.currency], index_where=text(EXTERNAL_INDEX_WHERE)
                )
            )
            found = await self._externals(currencies)
        return found

    async def _externals(self, currencies: set[str]) -> dict[str, External]:
        result = await self.conn.execute(EXTERNALS, {"currencies": sorted(currencies)})
        return {row.currency: External(row.id, row.currency) for row in result}

    async def apply(self, writes: Writes, answered: Sequence[Answered]) -> None:
        """Write the batch: balances, journal, and the key of each posting applied with its
        request's hash and response. A key (or journal request_id) that a concurrent
        transaction inserted and committed meanwhile raises ConcurrentClaim: run the batch
        again."""
        try:
            await self.conn.execute(APPLY, _apply_params(writes, answered))
        except IntegrityError as exc:
            if violated_constraint(exc) in CLAIM_CONSTRAINTS:
                raise ConcurrentClaim(violated_constraint(exc)) from exc
            raise

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
        return partitions(self.conn, stmt, batch_size)
