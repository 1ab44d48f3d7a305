"""Users: the unit of work and the rules of UserService, for any transport. Answers are ORM rows
(one user) or row tuples (GetUser's coalesced read and the export), which the gRPC room converts
without another copy."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import aclosing
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from service.app.users_import import Loader, StagedUser, stage_all
from service.db.coalescer import Outcome
from service.db.database import Database
from service.db.models import User, utcnow
from service.errors import FieldViolation, InvalidArgument
from service.repositories.users import UpsertCounts, UserRepository
from service.repositories.users import UserFields as UserFields  # what the callers fill in


class Users:
    """Create, read, change, page, export and bulk-load users."""

    def __init__(self, db: Database) -> None:
        self.db = db
        # GetUser: concurrent calls share one statement (WHERE id = ANY(:ids)) per batch.
        self._rows_by_id = db.point_reads(_rows_by_id, name="user read batch")

    async def create(self, email: str, first_name: str, last_name: str) -> User:
        """EMAIL_TAKEN if the email exists (deleted users included)."""

        async def create(session: AsyncSession) -> User:
            return await UserRepository(session).add(email, first_name, last_name)

        return await self.db.write(create)

    def row(self, user_id: int) -> Awaitable[Any]:
        """The user's row (repositories.users.USER_COLUMNS), soft-deleted ones included."""
        # The coalescer's own awaitable, handed on: GetUser's path gains a call, no coroutine.
        return self._rows_by_id.submit(user_id)

    async def update(self, user_id: int, changes: Mapping[str, object]) -> User:
        """Set the named fields (already checked) on the user, under its row lock."""

        async def update(session: AsyncSession) -> User:
            users = UserRepository(session)
            user = await users.get(user_id, for_update=True)
            for name, value in changes.items():
                setattr(user, name, value)
            await users.flush(user.email)
            return user

        return await self.db.write(update)

    async def set_deleted(self, user_id: int, *, deleted: bool) -> User:
        """Soft delete or undelete; a user already so is returned unchanged."""

        async def set_deleted(session: AsyncSession) -> User:
            user = await UserRepository(session).get(user_id, for_update=True)
            if user.is_deleted != deleted:
                user.deleted_at = utcnow() if deleted else None
                await session.flush()
            return user

        return await self.db.write(set_deleted)

    async def page(
        self,
        *,
        after_id: int,
        limit: int,
        show_deleted: bool,
        full_name: str,
        include_orders: bool,
    ) -> Sequence[User]:
        """Up to `limit` users after `after_id`, in id order (with their orders if asked)."""
        async with self.db.read() as session:
            return await UserRepository(session).page(
                after_id=after_id,
                limit=limit,
                show_deleted=show_deleted,
                full_name=full_name,
                include_orders=include_orders,
            )

    async def export(
        self, *, show_deleted: bool, active_only: bool, batch_size: int, after_id: int
    ) -> AsyncGenerator[Sequence[Any], None]:
        """Every matching user's row after `after_id`, batch_size rows at a time, from one
        snapshot. Close it (aclosing) when the caller stops early: the snapshot ends then."""
        async with self.db.snapshot() as session:
            batches = UserRepository(session).stream(
                show_deleted=show_deleted,
                active_only=active_only,
                batch_size=batch_size,
                after_id=after_id,
            )
            # Closed here, before the snapshot ends, even when the call ends at a yield.
            async with aclosing(batches):
                async for rows in batches:
                    yield rows

    async def upsert(self, rows: Sequence[UserFields]) -> UpsertCounts:
        """Insert or update by email in one statement; soft-deleted users are refused."""

        async def upsert(session: AsyncSession) -> UpsertCounts:
            return await UserRepository(session).upsert(rows)

        return await self.db.write(upsert)

    async def import_(self, batches: AsyncIterator[list[StagedUser]]) -> int:
        """COPY every batch straight into users, in a savepoint each, until an email is taken;
        that batch and the rest go into a staging table, merged at the end: all or nothing.

        The next batches are received and checked while the earlier ones are copied. The merge
        is a plain INSERT when no email was taken (the straight copies reached their bound);
        otherwise an upsert that refuses soft-deleted users and an email the import repeats
        (twice among the staged rows, or staged and copied straight in). An import large enough
        to move the statistics ends with ANALYZE users in the same transaction, so the next
        export is planned on them.

        The one write not retried: the stream is consumed once. A deadlock here is UNAVAILABLE
        with nothing applied, and the client sends the stream again."""
        async with self.db.transaction() as session:
            users = UserRepository(session)
            loader = Loader(users)
            await stage_all(batches, loader.load)
            imported = await loader.merge()
            if isinstance(imported, list):  # at most 10: the query's LIMIT
                raise InvalidArgument(
                    [
                        FieldViolation(
                            "users.email", f"{email} appears more than once in the import"
                        )
                        for email in imported
                    ]
                )
            if imported:
                await users.refresh_statistics(imported)
        return imported


async def _rows_by_id(conn: AsyncConnection, ids: Sequence[int]) -> Sequence[Outcome[Any]]:
    return await UserRepository(conn).rows_by_id(ids)
