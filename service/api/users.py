"""UserService: convert the request, call the application (service/app/users.py), convert."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from shop.v1 import resources_pb2 as pb
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc as api_grpc

from service.api.context import Context
from service.api.paging import PageTokens, last_id
from service.api.users_bulk import import_batches, user_rows
from service.api.users_convert import user_row_to_proto, user_to_proto
from service.api.users_encode import encode_user_batch
from service.api.validation import Violations
from service.app.users import Users

UPDATABLE_PATHS = frozenset({"first_name", "last_name", "email", "is_active"})
# A mask names each of the four paths once; the rest is room for repeats. Checked by len()
# before any path is read: 2M unknown paths made 2M violations (1.9 GB) before it.
MAX_MASK_PATHS = 100
MAX_UPSERT_BATCH = 1000


class UserServicer(api_grpc.UserServiceServicer):
    """Customers: CRUD with soft delete, pages, exports and bulk loads."""

    def __init__(self, users: Users, tokens: PageTokens) -> None:
        self.users = users
        self.tokens = tokens

    async def CreateUser(self, request: api.CreateUserRequest, context: Context) -> pb.User:
        """Create a user; EMAIL_TAKEN if the email exists (deleted users included)."""
        v = Violations()
        email = v.email("email", request.email)
        first = v.name("first_name", request.first_name)
        last = v.name("last_name", request.last_name)
        v.raise_if_any()
        return user_to_proto(await self.users.create(email, first, last))

    async def GetUser(self, request: api.GetUserRequest, context: Context) -> pb.User:
        """A user by id, soft-deleted ones included (deleted_at set)."""
        v = Violations()
        v.id("id", request.id)
        v.raise_if_any()
        return user_row_to_proto(await self.users.row(request.id))

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
        return user_to_proto(await self.users.update(request.user.id, changes))

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
        return user_to_proto(await self.users.set_deleted(user_id, deleted=deleted))

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
        page, next_token = await self.tokens.page(
            request.page_token,
            filters,
            limit,
            fetch=lambda after_id, count: self.users.page(
                after_id=after_id,
                limit=count,
                show_deleted=request.show_deleted,
                full_name=request.full_name,
                include_orders=request.include_orders,
            ),
        )
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
        messages = self.tokens.export(
            request.resume_token,
            filters,
            batches=lambda after_id: self.users.export(
                show_deleted=request.show_deleted,
                active_only=request.active_only,
                batch_size=batch_size,
                after_id=after_id,
            ),
            last_key=last_id,
            convert=encode_user_batch,
        )
        # Closed here, and with it the snapshot, even when the call ends at a yield.
        async with aclosing(messages):
            async for message in messages:
                yield message

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
        counts = await self.users.upsert(rows)
        return api.UpsertUsersResponse(inserted=counts.inserted, updated=counts.updated)

    async def ImportUsers(
        self,
        request_iterator: AsyncIterator[api.ImportUsersRequest],
        context: Context,
    ) -> api.ImportUsersResponse:
        """COPY every streamed batch into a staging table, then merge: all or nothing (the
        stream is read and checked ahead while the earlier batches are copied; not retried)."""
        return api.ImportUsersResponse(
            imported=await self.users.import_(import_batches(request_iterator))
        )
