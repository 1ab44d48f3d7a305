"""UserService: thin servicer over UserRepository."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from shop.v1 import resources_pb2 as pb
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc as api_grpc
from sqlalchemy.ext.asyncio import AsyncSession

from service.api.context import Context
from service.api.paging import PageTokens
from service.api.users_bulk import import_batches, user_rows
from service.api.users_convert import user_row_to_proto, user_to_proto
from service.api.users_encode import encode_user_batch
from service.api.validation import Violations
from service.app.users_import import StagedUser, stage_all
from service.db.database import Database
from service.db.models import utcnow
from service.repositories.users import UserRepository

UPDATABLE_PATHS = frozenset({"first_name", "last_name", "email", "is_active"})
# A mask names each of the four paths once; the rest is room for repeats. Checked by len()
# before any path is read: 2M unknown paths made 2M violations (1.9 GB) before it.
MAX_MASK_PATHS = 100
MAX_UPSERT_BATCH = 1000


class UserServicer(api_grpc.UserServiceServicer):
    """Customers: CRUD with soft delete, pages, exports and bulk loads."""

    def __init__(self, db: Database, tokens: PageTokens) -> None:
        self.db = db
        self.tokens = tokens
        # GetUser: concurrent calls share one statement (WHERE id = ANY(:ids)) per batch.
        self._users_by_id = db.point_reads(UserRepository.rows_by_id)

    async def CreateUser(self, request: api.CreateUserRequest, context: Context) -> pb.User:
        """Create a user; EMAIL_TAKEN if the email exists (deleted users included)."""
        v = Violations()
        email = v.email("email", request.email)
        first = v.name("first_name", request.first_name)
        last = v.name("last_name", request.last_name)
        v.raise_if_any()

        async def create(session: AsyncSession) -> pb.User:
            return user_to_proto(await UserRepository(session).add(email, first, last))

        return await self.db.write(create)

    async def GetUser(self, request: api.GetUserRequest, context: Context) -> pb.User:
        """A user by id, soft-deleted ones included (deleted_at set)."""
        v = Violations()
        v.id("id", request.id)
        v.raise_if_any()
        return user_row_to_proto(await self._users_by_id.submit(request.id))

    async def UpdateUser(self, request: api.UpdateUserRequest, context: Context) -> pb.User:
        """Apply the fields named by update_mask."""
        v = Violations()
        v.id("user.id", request.user.id)
        if len(request.update_mask.paths) > MAX_MASK_PATHS:
            v.add("update_mask.paths", f"at most {MAX_MASK_PATHS} paths")
            v.raise_if_any()
        paths = list(request.update_mask.paths)
        if not paths:
            v.add("update_mask", f"must name at least one of {', '.join(sorted(UPDATABLE_PATHS))}")
        changes: dict[str, object] = {}
        for path in paths:
            if path not in UPDATABLE_PATHS:
                v.add("update_mask", f"unknown path {path[:64]!r}")
            elif path == "email":
                changes[path] = v.email("user.email", request.user.email)
            elif path == "is_active":
                changes[path] = request.user.is_active
            else:
                changes[path] = v.name(f"user.{path}", getattr(request.user, path))
        v.raise_if_any()

        async def update(session: AsyncSession) -> pb.User:
            users = UserRepository(session)
            user = await users.get(request.user.id, for_update=True)
            for name, value in changes.items():
                setattr(user, name, value)
            await users.flush(user.email)
            return user_to_proto(user)

        return await self.db.write(update)

    async def DeleteUser(self, request: api.DeleteUserRequest, context: Context) -> pb.User:
        """Soft delete; deleting a deleted user returns it unchanged."""
        return await self._set_deleted(request.id, deleted=True)

    async def UndeleteUser(self, request: api.UndeleteUserRequest, context: Context) -> pb.User:
        """Clear deleted_at; undeleting a live user returns it unchanged."""
        return await self._set_deleted(request.id, deleted=False)

    async def _set_deleted(self, user_id: int, *, deleted: bool) -> pb.User:
        v = Violations()
        v.id("id", user_id)
        v.raise_if_any()

        async def set_deleted(session: AsyncSession) -> pb.User:
            user = await UserRepository(session).get(user_id, for_update=True)
            if user.is_deleted != deleted:
                user.deleted_at = utcnow() if deleted else None
                await session.flush()
            return user_to_proto(user)

        return await self.db.write(set_deleted)

    async def ListUsers(
        self, request: api.ListUsersRequest, context: Context
    ) -> api.ListUsersResponse:
        """A page of users in id ascending order."""
        v = Violations()
        limit = v.page_size("page_size", request.page_size)
        if request.full_name:
            v.name("full_name", request.full_name, max_length=201)
        v.raise_if_any()
        filters = {
            "show_deleted": request.show_deleted,
            "full_name": request.full_name,
            "include_orders": request.include_orders,
        }
        after_id = self.tokens.decode(request.page_token, filters) if request.page_token else 0
        async with self.db.read() as session:
            users = await UserRepository(session).page(
                after_id=after_id,
                limit=limit + 1,
                show_deleted=request.show_deleted,
                full_name=request.full_name,
                include_orders=request.include_orders,
            )
        page = users[:limit]
        next_token = self.tokens.encode(page[-1].id, filters) if len(users) > limit else ""
        return api.ListUsersResponse(
            users=[user_to_proto(u, with_orders=request.include_orders) for u in page],
            next_page_token=next_token,
        )

    async def StreamUsers(
        self, request: api.StreamUsersRequest, context: Context
    ) -> AsyncIterator[api.UserBatch]:
        """Every matching user, batch_size per message, from one consistent snapshot; each
        batch carries a resume token that starts a new export after its last user."""
        v = Violations()
        batch_size = v.batch_size("batch_size", request.batch_size)
        v.raise_if_any()
        # "export" keeps ListUsers page tokens from passing as resume tokens, and back.
        filters = {
            "export": "users",
            "show_deleted": request.show_deleted,
            "active_only": request.active_only,
        }
        after_id = self.tokens.resume_after(request.resume_token, filters)
        resume_token = self.tokens.encoder(filters)
        async with self.db.snapshot() as session:
            batches = UserRepository(session).stream(
                show_deleted=request.show_deleted,
                active_only=request.active_only,
                batch_size=batch_size,
                after_id=after_id,
            )
            # Closed here, before the snapshot ends, even when the call ends at a yield.
            async with aclosing(batches):
                async for rows in batches:
                    yield encode_user_batch(rows, resume_token(rows[-1].id))

    async def UpsertUsers(
        self, request: api.UpsertUsersRequest, context: Context
    ) -> api.UpsertUsersResponse:
        """Insert or update by email in one statement; soft-deleted users are refused."""
        v = Violations()
        if not request.users:
            v.add("users", "must not be empty")
        # By len(), before a row is read: what user_rows builds is bounded by MAX_UPSERT_BATCH.
        if len(request.users) > MAX_UPSERT_BATCH:
            v.add("users", f"at most {MAX_UPSERT_BATCH} users per call; use ImportUsers for more")
            v.raise_if_any()
        rows = user_rows(v, "users", list(request.users))
        v.raise_if_any()

        async def upsert(session: AsyncSession) -> api.UpsertUsersResponse:
            counts = await UserRepository(session).upsert(rows)
            return api.UpsertUsersResponse(inserted=counts.inserted, updated=counts.updated)

        return await self.db.write(upsert)

    async def ImportUsers(
        self,
        request_iterator: AsyncIterator[api.ImportUsersRequest],
        context: Context,
    ) -> api.ImportUsersResponse:
        """COPY every streamed batch into a staging table, then merge: all or nothing.

        The next messages are received and checked while the earlier ones are copied. The merge
        is a plain INSERT when every email is new; otherwise, once duplicates are ruled out,
        an upsert that refuses soft-deleted users. An import large enough to move the statistics
        ends with ANALYZE users in the same transaction, so the next export is planned on them.

        The one write not retried inside the service: the stream is consumed once. A deadlock
        here is UNAVAILABLE with nothing applied, and the client sends the stream again."""
        async with self.db.transaction() as session:
            users = UserRepository(session)
            staged = 0

            async def stage(records: list[StagedUser]) -> None:
                nonlocal staged
                await users.copy_into_staging(records, first=not staged)
                staged += len(records)

            await stage_all(import_batches(request_iterator), stage)
            if not staged:
                return api.ImportUsersResponse(imported=0)
            imported = await users.insert_staged()
            if imported is None:  # an email is taken or repeated
                duplicates = await users.staged_duplicates()
                if duplicates:
                    v = Violations()
                    for email in duplicates:  # at most 10: the query's LIMIT
                        v.add("users.email", f"{email} appears more than once in the import")
                    v.raise_if_any()
                imported = await users.merge_staging(staged)
            await users.refresh_statistics(imported)
        return api.ImportUsersResponse(imported=imported)
