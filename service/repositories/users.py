"""Users: CRUD with soft delete, keyset pages, column streams, bulk upsert and COPY import."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ARRAY, BigInteger, Row, Select, any_, bindparam, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import selectinload

from service.db.errors import sqlstate, violated_constraint
from service.db.models import Order, User
from service.db.streaming import Rows, epoch_microseconds, partitions
from service.errors import AlreadyExists, FailedPrecondition, NotFound
from service.repositories.handle import Repository
from service.repositories.orders import order_column_options

log = logging.getLogger(__name__)

EMAIL_UNIQUE = "uq_users_email"

# A user's columns as GetUser and StreamUsers send them, in the order users_convert unpacks
# them, the timestamps as epoch microseconds (cheaper to decode and convert than datetimes).
USER_COLUMNS = (
    User.id,
    User.email,
    User.first_name,
    User.last_name,
    User.is_active,
    epoch_microseconds(User.created_at).label("created_at"),
    epoch_microseconds(User.updated_at).label("updated_at"),
    epoch_microseconds(User.deleted_at).label("deleted_at"),
)

# GetUser's statement: the users of a batch of coalesced calls (db/coalescer.py), one array
# parameter whatever the batch size, so one statement text, compiled and prepared once.
_USER_ROWS_BY_ID = select(*USER_COLUMNS).where(
    User.id == any_(bindparam("ids", type_=ARRAY(BigInteger)))
)


# The bulk upsert: the batch arrives as one array per column and is ordered by email in the
# statement, so overlapping concurrent batches lock rows in the same order (no deadlock). A user
# soft-deleted after refuse_deleted looked is left alone (the caller counts the rows returned);
# xmax = 0 only for a freshly inserted row version.
UPSERT = text(
    "INSERT INTO users (email, first_name, last_name, is_active) "
    "SELECT email, first_name, last_name, is_active FROM unnest(CAST(:emails AS text[]), "
    "CAST(:first_names AS text[]), CAST(:last_names AS text[]), CAST(:actives AS boolean[])) "
    "AS batch (email, first_name, last_name, is_active) ORDER BY email "
    "ON CONFLICT (email) DO UPDATE SET first_name = excluded.first_name, "
    "last_name = excluded.last_name, is_active = excluded.is_active, updated_at = now() "
    "WHERE users.deleted_at IS NULL RETURNING xmax = 0"
)
DELETED_AMONG = text(
    "SELECT email FROM users WHERE email = ANY(CAST(:emails AS text[])) "
    "AND deleted_at IS NOT NULL ORDER BY email"
)


@dataclass(frozen=True, slots=True)
class UserFields:
    """One row of a bulk write."""

    email: str
    first_name: str
    last_name: str
    is_active: bool


@dataclass(frozen=True, slots=True)
class UpsertCounts:
    inserted: int
    updated: int


def _refuse(deleted: list[str]) -> None:
    """USER_DELETED naming the soft-deleted users of a bulk write (up to 10), if there are any."""
    if deleted:
        raise FailedPrecondition(
            f"users are deleted: {', '.join(deleted[:10])}",
            reason="USER_DELETED",
            emails=",".join(deleted[:10]),
        )


def _email_taken(exc: IntegrityError, email: str) -> AlreadyExists | None:
    if violated_constraint(exc) == EMAIL_UNIQUE:
        return AlreadyExists(f"email {email} is taken", reason="EMAIL_TAKEN", email=email)
    return None


class UserRepository(Repository):
    async def rows_by_id(self, user_ids: Sequence[int]) -> list[Row[*tuple[Any, ...]] | NotFound]:
        """Each id's row of USER_COLUMNS, or NotFound, in the order asked (an id may come more
        than once), soft-deleted users included: one statement for them all (GetUser's
        coalesced reads, on a Core connection: no session, no ORM)."""
        found = await self.on.execute(_USER_ROWS_BY_ID, {"ids": list(set(user_ids))})
        rows: dict[int, Row[*tuple[Any, ...]]] = {row.id: row for row in found}
        return [rows[i] if i in rows else NotFound("user", i) for i in user_ids]

    async def add(self, email: str, first_name: str, last_name: str) -> User:
        user = User(email=email, first_name=first_name, last_name=last_name)
        self.session.add(user)
        await self.flush(email)
        return user

    async def flush(self, email: str) -> None:
        """Flush pending changes, turning a duplicate email into EMAIL_TAKEN."""
        try:
            await self.session.flush()
        except IntegrityError as exc:
            raise (_email_taken(exc, email) or exc) from exc

    async def get(self, user_id: int, *, for_update: bool = False) -> User:
        stmt = select(User).where(User.id == user_id)
        if for_update:
            stmt = stmt.with_for_update()
        user = (await self.session.execute(stmt)).scalar_one_or_none()
        if user is None:
            raise NotFound("user", user_id)
        return user

    async def get_live(self, user_id: int) -> User:
        """A user that exists and is not soft-deleted (USER_DELETED otherwise)."""
        user = await self.get(user_id)
        if user.is_deleted:
            raise FailedPrecondition(
                f"user {user_id} is deleted", reason="USER_DELETED", id=user_id
            )
        return user

    async def page(
        self,
        *,
        after_id: int,
        limit: int,
        show_deleted: bool,
        full_name: str,
        include_orders: bool,
    ) -> Sequence[User]:
        """Users with id > after_id, ascending (keyset pagination)."""
        stmt = select(User).where(User.id > after_id).order_by(User.id).limit(limit)
        if not show_deleted:
            stmt = stmt.where(User.deleted_at.is_(None))
        if full_name:
            pattern = "%" + full_name.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_")
            stmt = stmt.where(User.full_name.ilike(pattern + "%", escape="\\"))
        if include_orders:
            # order_to_proto reads each order's items: load them too (one query per level).
            stmt = stmt.options(
                selectinload(User.orders).options(
                    selectinload(Order.items), *order_column_options(self.session)
                )
            )
        return (await self.session.scalars(stmt)).all()

    @staticmethod
    def export_query(*, show_deleted: bool, active_only: bool) -> Select[*tuple[Any, ...]]:
        stmt = select(*USER_COLUMNS).order_by(User.id)
        if not show_deleted:
            stmt = stmt.where(User.deleted_at.is_(None))
        if active_only:
            stmt = stmt.where(User.is_active)
        return stmt

    def stream(
        self, *, show_deleted: bool, active_only: bool, batch_size: int, after_id: int = 0
    ) -> AsyncGenerator[Rows, None]:
        """Matching users with id > after_id as rows of USER_COLUMNS, batch_size per
        partition, from a server-side cursor (after_id resumes an export)."""
        stmt = self.export_query(show_deleted=show_deleted, active_only=active_only)
        return partitions(self.session, stmt.where(User.id > after_id), batch_size)

    async def refuse_deleted(self, emails: Sequence[str]) -> None:
        """Bulk writes do not revive soft-deleted users: Undelete is explicit."""
        _refuse(list((await self.session.scalars(DELETED_AMONG, {"emails": list(emails)})).all()))

    async def upsert(self, rows: Sequence[UserFields]) -> UpsertCounts:
        """One INSERT ... ON CONFLICT (email) DO UPDATE for the batch, rows sorted by email so
        that overlapping concurrent batches lock in the same order and cannot deadlock."""
        if not rows:
            return UpsertCounts(0, 0)
        await self.refuse_deleted([r.email for r in rows])
        # Four arrays, not 4 x len(rows) parameters: one statement text whatever the batch
        # size, so it is compiled and prepared once, and binding is a column per array.
        params = {
            "emails": [r.email for r in rows],
            "first_names": [r.first_name for r in rows],
            "last_names": [r.last_name for r in rows],
            "actives": [r.is_active for r in rows],
        }
        inserted_flags: Sequence[bool] = (await self.session.scalars(UPSERT, params)).all()
        inserted = sum(1 for flag in inserted_flags if flag)
        if len(inserted_flags) != len(rows):
            raise FailedPrecondition("a user in the batch was deleted", reason="USER_DELETED")
        return UpsertCounts(inserted, len(inserted_flags) - inserted)

    # --- ImportUsers: COPY straight into users; a staging table and one merge for the rest ----

    _IMPORT_COLUMNS = ("email", "first_name", "last_name", "is_active")
    # Created only when a batch cannot go straight into users: a temp table (no WAL) without
    # index, filled by COPY and read by one sorted scan.
    _CREATE_STAGING = text(
        "CREATE TEMP TABLE users_import "
        "(email text, first_name text, last_name text, is_active boolean) "
        "ON COMMIT DROP"
    )
    # The subtransactions (savepoints) of the batches copied straight into users: each batch's
    # rows carry its xid as xmin, so its first email finds it.
    _COPIED_XIDS = text("SELECT xmin::text FROM users WHERE email = ANY(CAST(:emails AS text[]))")
    # Sorted by email, as UPSERT is: concurrent writers lock and insert rows in the same order.
    _INSERT_STAGED_SQL = (
        "INSERT INTO users (email, first_name, last_name, is_active) "
        "SELECT email, first_name, last_name, is_active FROM users_import ORDER BY email"
    )
    _INSERT_STAGED = text(_INSERT_STAGED_SQL)
    # A row this import copied straight in (its xmin one of :copied) is not updated: the email
    # is in the import twice, and the short row count sends merge_staging looking why.
    _MERGE_STAGED = text(
        _INSERT_STAGED_SQL + " ON CONFLICT (email) DO UPDATE SET first_name = excluded.first_name, "
        "last_name = excluded.last_name, is_active = excluded.is_active, "
        "updated_at = now() WHERE users.deleted_at IS NULL "
        "AND NOT users.xmin = ANY(CAST(CAST(:copied AS text[]) AS xid[]))"
    )
    # Repeated among the staged rows, or staged and copied straight in (xmin one of :copied).
    _STAGED_DUPLICATES = text(
        "SELECT email FROM users_import GROUP BY email HAVING count(*) > 1 "
        "UNION SELECT i.email FROM users_import i JOIN users u USING (email) "
        "WHERE u.xmin = ANY(CAST(CAST(:copied AS text[]) AS xid[])) ORDER BY email LIMIT 10"
    )
    _STAGED_DELETED = text(
        "SELECT u.email FROM users_import i JOIN users u USING (email) "
        "WHERE u.deleted_at IS NOT NULL ORDER BY u.email LIMIT 10"
    )
    # cardinality_violation: ON CONFLICT DO UPDATE met the same email twice in its rows.
    _MERGED_TWICE = "21000"

    async def _copy(self, table: str, records: Sequence[tuple[str, str, str, bool]]) -> None:
        # COPY is the driver's own protocol: reached as the seed does, through the session's
        # connection (same transaction), which SQLAlchemy checks out and returns itself.
        connection = await self.session.connection()
        driver = (await connection.get_raw_connection()).driver_connection
        assert driver is not None  # a connection in use is open
        await driver.copy_records_to_table(table, records=records, columns=self._IMPORT_COLUMNS)

    async def copy_into_users(self, records: Sequence[tuple[str, str, str, bool]]) -> bool:
        """COPY (email, first_name, last_name, is_active) records straight into users, in a
        savepoint, as a raw COPY would (the change log's statement triggers fire for COPY
        too). False when an email is taken (by a user, by a batch copied before, or twice in
        these records): the savepoint is rolled back, none of them written."""
        try:
            async with self.session.begin_nested():
                await self._copy("users", records)
        except Exception as exc:
            if violated_constraint(exc) != EMAIL_UNIQUE:
                raise
            return False
        return True

    async def copy_into_staging(
        self, records: Sequence[tuple[str, str, str, bool]], *, first: bool
    ) -> None:
        """COPY (email, first_name, last_name, is_active) records into the transaction's staging
        table, created with the first batch."""
        if first:
            await self.session.execute(self._CREATE_STAGING)
        await self._copy("users_import", records)

    async def copied_xids(self, first_emails: Sequence[str]) -> list[str]:
        """The xids of the batches copied straight in, from each batch's first email."""
        if not first_emails:
            return []
        found = await self.session.scalars(self._COPIED_XIDS, {"emails": list(first_emails)})
        return list(found.all())

    async def insert_staged(self) -> int | None:
        """The merge when every staged email is new: a plain INSERT, which spares the
        speculative insertion of ON CONFLICT (some 40% of its time), inside a savepoint. Its
        success proves there was nothing to update, no soft-deleted user and no email staged
        twice or copied straight in before: the rows inserted are returned. When a staged
        email is taken or repeated, the savepoint is rolled back (the rows inserted before it
        are undone) and None returned: merge_staging() then merges and reports."""
        try:
            async with self.session.begin_nested():
                result = await self.session.execute(self._INSERT_STAGED)
        except IntegrityError as exc:
            if violated_constraint(exc) != EMAIL_UNIQUE:
                raise
            return None
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def staged_duplicates(self, copied: Sequence[str] = ()) -> list[str]:
        """Up to 10 emails in the import twice: staged twice, or staged and also copied
        straight in by a batch whose xid is in `copied` (copied_xids)."""
        result = await self.session.scalars(self._STAGED_DUPLICATES, {"copied": list(copied)})
        return list(result.all())

    async def merge_staging(self, staged: int, copied: Sequence[str] = ()) -> int | None:
        """Upsert the staged rows with the same semantics as upsert(); returns rows merged, or
        None when an email is in the import twice (staged_duplicates() names them). `staged` is
        how many rows were staged, `copied` the xids of the batches copied straight in. The
        merge runs in a savepoint: an email staged twice fails it (21000). A soft-deleted user,
        or a row copied straight in, is left alone (its WHERE), so fewer rows merged than
        staged says why: a repeat, else USER_DELETED naming them, and the caller's transaction
        rolls back (a partial import is not one we give)."""
        try:
            async with self.session.begin_nested():
                result = await self.session.execute(self._MERGE_STAGED, {"copied": list(copied)})
        except DBAPIError as exc:
            if sqlstate(exc) != self._MERGED_TWICE:
                raise
            return None
        merged = int(result.rowcount)  # type: ignore[attr-defined]
        if merged != staged:
            if await self.staged_duplicates(copied):
                return None
            _refuse(list((await self.session.scalars(self._STAGED_DELETED)).all()))
            # Deleted and undeleted again by others since the merge: still not applied whole.
            raise FailedPrecondition("a user in the import was deleted", reason="USER_DELETED")
        return merged

    # An import moves the statistics once it adds more than autovacuum's own ANALYZE trigger
    # would wait for (autovacuum_analyze_scale_factor 0.1 of the table), with a floor: below it
    # the planner's choices for users cost little either way, and a few rows do not pay an
    # ANALYZE (~170 ms for 1M rows: it samples 30,000 rows whatever the table's size).
    ANALYZE_MIN_ROWS = 1_000
    ANALYZE_FRACTION = 0.1
    _ESTIMATED_ROWS = text("SELECT reltuples FROM pg_class WHERE oid = 'users'::regclass")
    # Waiting for the lock (an autovacuum, a CREATE INDEX CONCURRENTLY) would hold the import's
    # transaction and its row locks: not worth it for statistics autovacuum will refresh anyway.
    _ANALYZE_LOCK_TIMEOUT = text("SELECT set_config('lock_timeout', '100ms', true)")
    _ANALYZE = text("ANALYZE users")
    # lock_not_available; query_canceled (statement_timeout: the call's deadline is near).
    _ANALYZE_GIVEN_UP = frozenset({"55P03", "57014"})

    async def refresh_statistics(self, imported: int) -> bool:
        """ANALYZE users, in the import's transaction after its merge, when `imported` rows are
        enough to move the statistics (PostgreSQL's advice after a bulk load): an export right
        after a large import is then planned on statistics that count its rows. ANALYZE in the
        transaction counts the transaction's own rows as live, and its pg_statistic rows commit
        or roll back with the import. Runs in a savepoint: when the lock is not had at once or
        the time is up, the import goes ahead and autovacuum analyzes later. True if analyzed.
        """
        estimated = await self.session.scalar(self._ESTIMATED_ROWS)  # -1: never analyzed
        threshold = self.ANALYZE_MIN_ROWS + self.ANALYZE_FRACTION * max(estimated or 0.0, 0.0)
        if imported < threshold:
            return False
        try:
            async with self.session.begin_nested():
                await self.session.execute(self._ANALYZE_LOCK_TIMEOUT)
                await self.session.execute(self._ANALYZE)
        except DBAPIError as exc:
            if sqlstate(exc) not in self._ANALYZE_GIVEN_UP:
                raise
            log.info("users not analyzed after an import of %d rows (%s)", imported, sqlstate(exc))
            return False
        return True
