"""UserService over the real gRPC channel, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from shop.v1 import resources_pb2 as pb
from shop.v1 import user_service_pb2 as api
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.paging import MAX_TOKEN_LENGTH, PageTokens
from service.api.users import MAX_MASK_PATHS
from service.api.users_bulk import MAX_MESSAGE_USERS
from service.config import Settings
from service.db.models import User
from tests.factories import Factory
from tests.rpc import rpc_fails, stream_fails
from tests.servers import own_server
from tests.unit.test_paging import signed_token

INVALID = grpc.StatusCode.INVALID_ARGUMENT


# --- helpers -----------------------------------------------------------------------------------


async def bulk_users(
    engine: AsyncEngine,
    count: int,
    *,
    prefix: str = "bulk",
    deleted: bool = False,
    is_active: bool = True,
) -> None:
    """`count` users in one INSERT ... SELECT generate_series (fast for thousands)."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO users (email, first_name, last_name, is_active, deleted_at) "
                "SELECT :prefix || g || '@example.com', 'Bulk', 'User' || g, :active, "
                "CASE WHEN :deleted THEN now() END FROM generate_series(1, :count) g"
            ),
            {"prefix": prefix, "count": count, "active": is_active, "deleted": deleted},
        )


async def users_with_orders(engine: AsyncEngine, count: int) -> None:
    """`count` users, each with one order of two items, in three statements."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO users (email, first_name, last_name) "
                "SELECT 'buyer' || g || '@example.com', 'Buyer', 'No' || g "
                "FROM generate_series(1, :count) g"
            ),
            {"count": count},
        )
        await conn.execute(
            text(
                "INSERT INTO orders (user_id, status, total, currency)"
                " SELECT id, 'pending', 3.50, 'EUR' FROM users"
            )
        )
        await conn.execute(
            text(
                "INSERT INTO order_items (order_id, sku, quantity, unit_price) "
                "SELECT id, 'A', 1, 1.50 FROM orders UNION ALL "
                "SELECT id, 'B', 2, 1.00 FROM orders"
            )
        )


async def db_users(engine: AsyncEngine) -> dict[str, Any]:
    """What the users table holds, keyed by email."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(User.__table__).order_by(User.id))).all()
    return {r.email: r for r in rows}


async def user_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(User))).scalar_one())


def upsert_user(
    email: str, first: str = "Ada", last: str = "Lovelace", **kw: Any
) -> api.UpsertUser:
    return api.UpsertUser(email=email, first_name=first, last_name=last, **kw)


async def requests(*batches: list[api.UpsertUser]) -> AsyncIterator[api.ImportUsersRequest]:
    for batch in batches:
        yield api.ImportUsersRequest(users=batch)


async def list_all(stub: Any, **filters: Any) -> list[pb.User]:
    """Follow next_page_token until it is empty."""
    users: list[pb.User] = []
    token = ""
    while True:
        page = await stub.ListUsers(api.ListUsersRequest(page_token=token, **filters))
        users.extend(page.users)
        token = page.next_page_token
        if not token:
            return users


async def wait_until(condition: Callable[[], Any], what: str, attempts: int = 200) -> None:
    """Poll an async condition (up to ~10 s); fails the test if it never holds."""
    for _ in range(attempts):
        if await condition():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


# --- CreateUser --------------------------------------------------------------------------------


async def test_create_user_lowercases_email_and_joins_full_name(user_stub, engine) -> None:
    created = await user_stub.CreateUser(
        api.CreateUserRequest(
            email="Grace.Hopper@Navy.MIL", first_name=" Grace ", last_name="Hopper"
        )
    )
    assert created.id > 0
    assert created.email == "grace.hopper@navy.mil"
    assert created.first_name == "Grace"
    assert created.full_name == "Grace Hopper"
    assert created.is_active
    assert created.HasField("created_at") and created.HasField("updated_at")
    assert not created.HasField("deleted_at")
    row = (await db_users(engine))["grace.hopper@navy.mil"]
    assert (row.id, row.first_name, row.last_name) == (created.id, "Grace", "Hopper")


@pytest.mark.parametrize(
    "email", ["", "not-an-email", "a@b", "two@@example.com", "sp ace@example.com", "nul\x00@ex.com"]
)
async def test_create_user_rejects_malformed_email(user_stub, engine, email) -> None:
    failure = await rpc_fails(
        user_stub.CreateUser(api.CreateUserRequest(email=email, first_name="A", last_name="B"))
    )
    assert failure.code == INVALID
    assert failure.domain == "shop.v1"
    assert failure.reason == "INVALID_ARGUMENT"
    assert set(failure.violations) == {"email"}
    assert await user_count(engine) == 0


@pytest.mark.parametrize("bad", ["", "   ", "Ad\x00a", "x" * 101])
async def test_create_user_rejects_bad_names(user_stub, engine, bad) -> None:
    failure = await rpc_fails(
        user_stub.CreateUser(
            api.CreateUserRequest(email="ada@example.com", first_name=bad, last_name=bad)
        )
    )
    assert failure.code == INVALID
    assert set(failure.violations) == {"first_name", "last_name"}
    assert await user_count(engine) == 0


@pytest.mark.parametrize("char", ["\u202e", "\u200b", "\ufeff", "\x85"])
async def test_create_user_refuses_control_and_format_characters_in_names(
    user_stub, engine, char
) -> None:
    failure = await rpc_fails(
        user_stub.CreateUser(
            api.CreateUserRequest(email="ada@example.com", first_name=f"Ad{char}a", last_name="K")
        )
    )
    assert failure.code == INVALID
    assert failure.violations == {
        "first_name": "must not hold control or format characters (such as U+202E)"
    }
    assert await user_count(engine) == 0


async def test_create_user_refuses_a_right_to_left_override_in_the_email(user_stub) -> None:
    failure = await rpc_fails(
        user_stub.CreateUser(
            api.CreateUserRequest(email="moc.elpmaxe@\u202eada", first_name="A", last_name="B")
        )
    )
    assert failure.code == INVALID
    assert set(failure.violations) == {"email"}


async def test_create_user_accepts_letters_beyond_ascii(user_stub) -> None:
    created = await user_stub.CreateUser(
        api.CreateUserRequest(email="zoe@example.com", first_name="Zoë", last_name="Ångström")
    )
    assert created.full_name == "Zoë Ångström"


async def test_create_user_reports_every_violation_at_once(user_stub) -> None:
    failure = await rpc_fails(user_stub.CreateUser(api.CreateUserRequest()))
    assert failure.code == INVALID
    assert set(failure.violations) == {"email", "first_name", "last_name"}


async def test_create_user_with_taken_email_is_already_exists(user_stub, factory: Factory) -> None:
    await factory.user(email="ada@example.com")
    failure = await rpc_fails(
        user_stub.CreateUser(
            api.CreateUserRequest(email="ADA@example.com", first_name="A", last_name="B")
        )
    )
    assert failure.code == grpc.StatusCode.ALREADY_EXISTS
    assert failure.reason == "EMAIL_TAKEN"
    assert failure.domain == "shop.v1"
    assert failure.metadata == {"email": "ada@example.com"}


async def test_create_user_with_email_of_soft_deleted_user_is_taken(
    user_stub, factory: Factory, engine
) -> None:
    await factory.user(email="gone@example.com", deleted=True)
    failure = await rpc_fails(
        user_stub.CreateUser(
            api.CreateUserRequest(email="gone@example.com", first_name="A", last_name="B")
        )
    )
    assert failure.code == grpc.StatusCode.ALREADY_EXISTS
    assert failure.reason == "EMAIL_TAKEN"
    assert await user_count(engine) == 1


# --- GetUser -----------------------------------------------------------------------------------


async def test_get_user(user_stub, factory: Factory) -> None:
    user = await factory.user(email="ada@example.com", first_name="Ada", last_name="Lovelace")
    got = await user_stub.GetUser(api.GetUserRequest(id=user.id))
    assert (got.id, got.email, got.full_name) == (user.id, "ada@example.com", "Ada Lovelace")
    assert not got.HasField("deleted_at")
    assert len(got.orders) == 0


async def test_get_user_returns_soft_deleted_user_with_deleted_at(user_stub, factory) -> None:
    user = await factory.user(deleted=True)
    got = await user_stub.GetUser(api.GetUserRequest(id=user.id))
    assert got.id == user.id
    assert got.HasField("deleted_at")
    assert got.deleted_at.ToDatetime(UTC) == user.deleted_at


async def test_get_missing_user_is_not_found(user_stub) -> None:
    failure = await rpc_fails(user_stub.GetUser(api.GetUserRequest(id=987654)))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.reason == "USER_NOT_FOUND"
    assert failure.domain == "shop.v1"
    assert failure.metadata == {"id": "987654"}


@pytest.mark.parametrize("bad_id", [0, -1, -(2**63)])
async def test_get_user_with_non_positive_id_is_invalid(user_stub, bad_id) -> None:
    failure = await rpc_fails(user_stub.GetUser(api.GetUserRequest(id=bad_id)))
    assert failure.code == INVALID
    assert set(failure.violations) == {"id"}


# --- UpdateUser --------------------------------------------------------------------------------


def update(user_id: int, paths: list[str], **fields: Any) -> api.UpdateUserRequest:
    return api.UpdateUserRequest(
        user=pb.User(id=user_id, **fields), update_mask=FieldMask(paths=paths)
    )


@pytest.mark.parametrize(
    ("path", "fields", "expected"),
    [
        ("first_name", {"first_name": " Augusta "}, {"first_name": "Augusta"}),
        ("last_name", {"last_name": "King"}, {"last_name": "King"}),
        ("email", {"email": "Countess@Example.com"}, {"email": "countess@example.com"}),
        ("is_active", {"is_active": False}, {"is_active": False}),
    ],
)
async def test_update_user_applies_only_the_masked_path(
    user_stub, factory: Factory, engine, path, fields, expected
) -> None:
    user = await factory.user(email="ada@example.com", first_name="Ada", last_name="Lovelace")
    before = await user_stub.GetUser(api.GetUserRequest(id=user.id))
    # Every other field is set in the message too: only the masked one may be taken.
    decoy = {
        "email": "decoy@example.com",
        "first_name": "Decoy",
        "last_name": "Decoy",
        "is_active": False,
    }
    updated = await user_stub.UpdateUser(update(user.id, [path], **{**decoy, **fields}))
    want = {
        "email": "ada@example.com",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "is_active": True,
        **expected,
    }
    row = (await db_users(engine))[want["email"]]
    for name, value in want.items():
        assert getattr(updated, name) == value
        assert getattr(row, name) == value
    assert updated.full_name == f"{want['first_name']} {want['last_name']}"
    assert updated.updated_at.ToDatetime() > before.updated_at.ToDatetime()
    assert updated.created_at == before.created_at


async def test_update_user_with_several_paths(user_stub, factory: Factory) -> None:
    user = await factory.user()
    updated = await user_stub.UpdateUser(
        update(user.id, ["first_name", "last_name"], first_name="Grace", last_name="Hopper")
    )
    assert updated.full_name == "Grace Hopper"


@pytest.mark.parametrize(
    ("paths", "field"),
    [([], "update_mask"), (["full_name"], "update_mask"), (["id"], "update_mask")],
)
async def test_update_user_with_bad_mask_is_invalid(
    user_stub, factory: Factory, engine, paths, field
) -> None:
    user = await factory.user(first_name="Ada")
    failure = await rpc_fails(user_stub.UpdateUser(update(user.id, paths, first_name="X")))
    assert failure.code == INVALID
    assert set(failure.violations) == {field}
    row = next(iter((await db_users(engine)).values()))
    assert row.first_name == "Ada"


async def test_update_user_with_more_mask_paths_than_the_bound_is_invalid(
    user_stub, factory: Factory
) -> None:
    user = await factory.user()
    paths = ["first_name"] * (MAX_MASK_PATHS + 1)
    failure = await rpc_fails(user_stub.UpdateUser(update(user.id, paths, first_name="X")))
    assert failure.code == INVALID
    assert failure.violations == {"update_mask.paths": f"at most {MAX_MASK_PATHS} paths"}


async def test_update_user_with_many_unknown_paths_names_ten_and_counts_the_rest(
    user_stub, factory: Factory
) -> None:
    user = await factory.user()
    paths = [f"p{i}" for i in range(MAX_MASK_PATHS)]
    failure = await rpc_fails(user_stub.UpdateUser(update(user.id, paths)))
    assert failure.code == INVALID
    # One field, so one entry in the dict: the tenth violation's, the last one sent.
    assert failure.violations == {"update_mask": "unknown path 'p9'"}
    assert failure.metadata == {"omitted_violations": "90"}
    assert failure.message == "invalid request: update_mask and 90 more"


async def test_update_user_validates_masked_values(user_stub, factory: Factory) -> None:
    user = await factory.user()
    failure = await rpc_fails(
        user_stub.UpdateUser(
            update(user.id, ["email", "first_name"], email="nope", first_name="  ")
        )
    )
    assert failure.code == INVALID
    assert set(failure.violations) == {"user.email", "user.first_name"}


async def test_update_user_without_id_is_invalid(user_stub) -> None:
    failure = await rpc_fails(user_stub.UpdateUser(update(0, ["first_name"], first_name="A")))
    assert failure.code == INVALID
    assert set(failure.violations) == {"user.id"}


async def test_update_user_to_taken_email_is_already_exists(
    user_stub, factory: Factory, engine
) -> None:
    await factory.user(email="taken@example.com")
    user = await factory.user(email="mine@example.com")
    failure = await rpc_fails(
        user_stub.UpdateUser(update(user.id, ["email"], email="Taken@example.com"))
    )
    assert failure.code == grpc.StatusCode.ALREADY_EXISTS
    assert failure.reason == "EMAIL_TAKEN"
    assert "mine@example.com" in await db_users(engine)


async def test_update_missing_user_is_not_found(user_stub) -> None:
    failure = await rpc_fails(user_stub.UpdateUser(update(424242, ["first_name"], first_name="A")))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.reason == "USER_NOT_FOUND"


# --- DeleteUser / UndeleteUser -----------------------------------------------------------------


async def test_delete_user_is_soft(user_stub, factory: Factory, engine) -> None:
    user = await factory.user(email="ada@example.com")
    deleted = await user_stub.DeleteUser(api.DeleteUserRequest(id=user.id))
    assert deleted.id == user.id
    assert deleted.HasField("deleted_at")
    row = (await db_users(engine))["ada@example.com"]
    assert row.deleted_at is not None
    assert deleted.deleted_at.ToDatetime(UTC) == row.deleted_at


async def test_delete_deleted_user_is_a_no_op(user_stub, factory: Factory, engine) -> None:
    user = await factory.user(email="ada@example.com")
    first = await user_stub.DeleteUser(api.DeleteUserRequest(id=user.id))
    again = await user_stub.DeleteUser(api.DeleteUserRequest(id=user.id))
    assert again == first
    row = (await db_users(engine))["ada@example.com"]
    assert row.deleted_at == first.deleted_at.ToDatetime(UTC)


async def test_undelete_user_clears_deleted_at(user_stub, factory: Factory, engine) -> None:
    user = await factory.user(email="ada@example.com", deleted=True)
    restored = await user_stub.UndeleteUser(api.UndeleteUserRequest(id=user.id))
    assert restored.id == user.id
    assert not restored.HasField("deleted_at")
    assert (await db_users(engine))["ada@example.com"].deleted_at is None
    # Undeleting a live user returns it unchanged.
    again = await user_stub.UndeleteUser(api.UndeleteUserRequest(id=user.id))
    assert again == restored


async def test_delete_and_undelete_missing_user_are_not_found(user_stub) -> None:
    for call in (
        user_stub.DeleteUser(api.DeleteUserRequest(id=99999)),
        user_stub.UndeleteUser(api.UndeleteUserRequest(id=99999)),
    ):
        failure = await rpc_fails(call)
        assert failure.code == grpc.StatusCode.NOT_FOUND
        assert failure.reason == "USER_NOT_FOUND"


async def test_delete_and_undelete_with_bad_id_are_invalid(user_stub) -> None:
    for call in (
        user_stub.DeleteUser(api.DeleteUserRequest(id=0)),
        user_stub.UndeleteUser(api.UndeleteUserRequest(id=-5)),
    ):
        failure = await rpc_fails(call)
        assert failure.code == INVALID
        assert set(failure.violations) == {"id"}


# --- ListUsers ---------------------------------------------------------------------------------


async def test_list_users_pages_in_id_order(user_stub, engine) -> None:
    await bulk_users(engine, 7)
    page = await user_stub.ListUsers(api.ListUsersRequest(page_size=3))
    assert len(page.users) == 3
    assert page.next_page_token
    users = await list_all(user_stub, page_size=3)
    ids = [u.id for u in users]
    assert ids == sorted(ids)
    assert len(set(ids)) == 7
    assert set(ids) == {r.id for r in (await db_users(engine)).values()}


async def test_list_users_last_page_has_no_token(user_stub, engine) -> None:
    await bulk_users(engine, 3)
    page = await user_stub.ListUsers(api.ListUsersRequest(page_size=3))
    assert len(page.users) == 3
    assert page.next_page_token == ""
    everyone = await user_stub.ListUsers(api.ListUsersRequest())
    assert len(everyone.users) == 3
    assert everyone.next_page_token == ""


async def test_list_users_on_empty_table(user_stub) -> None:
    page = await user_stub.ListUsers(api.ListUsersRequest())
    assert len(page.users) == 0
    assert page.next_page_token == ""


async def test_list_users_default_page_size_is_50(user_stub, engine) -> None:
    await bulk_users(engine, 51)
    page = await user_stub.ListUsers(api.ListUsersRequest(page_size=0))
    assert len(page.users) == 50
    rest = await user_stub.ListUsers(api.ListUsersRequest(page_token=page.next_page_token))
    assert len(rest.users) == 1
    assert rest.next_page_token == ""


async def test_list_users_page_size_is_capped_at_1000(user_stub, engine) -> None:
    await bulk_users(engine, 1001)
    page = await user_stub.ListUsers(api.ListUsersRequest(page_size=5000))
    assert len(page.users) == 1000
    assert page.next_page_token
    rest = await user_stub.ListUsers(
        api.ListUsersRequest(page_size=5000, page_token=page.next_page_token)
    )
    assert len(rest.users) == 1
    assert rest.users[0].id > page.users[-1].id


async def test_list_users_negative_page_size_is_invalid(user_stub) -> None:
    failure = await rpc_fails(user_stub.ListUsers(api.ListUsersRequest(page_size=-1)))
    assert failure.code == INVALID
    assert set(failure.violations) == {"page_size"}


def _flip(token: str, index: int) -> str:
    char = token[index]
    return token[:index] + ("B" if char != "B" else "C") + token[index + 1 :]


async def test_list_users_rejects_bad_page_tokens(user_stub, engine) -> None:
    await bulk_users(engine, 3)
    token = (await user_stub.ListUsers(api.ListUsersRequest(page_size=1))).next_page_token
    payload, _signature = token.split(".")
    bad_tokens = [
        "garbage",
        "a.b.c",
        "!!!.???",
        "é.é",
        _flip(token, 0),  # payload changed
        _flip(token, len(payload) + 1 + 3),  # signature changed
        payload + ".",  # no signature
        f"{payload}.{payload}",  # signature of something else
    ]
    for bad in bad_tokens:
        failure = await rpc_fails(
            user_stub.ListUsers(api.ListUsersRequest(page_size=1, page_token=bad))
        )
        assert failure.code == INVALID, bad
        assert set(failure.violations) == {"page_token"}, bad
    # The untouched token still works.
    page = await user_stub.ListUsers(api.ListUsersRequest(page_size=1, page_token=token))
    assert len(page.users) == 1


@pytest.mark.parametrize(
    "other", [{"show_deleted": True}, {"full_name": "bulk"}, {"include_orders": True}]
)
async def test_list_users_token_is_bound_to_filters(user_stub, engine, other) -> None:
    await bulk_users(engine, 3)
    token = (await user_stub.ListUsers(api.ListUsersRequest(page_size=1))).next_page_token
    failure = await rpc_fails(
        user_stub.ListUsers(api.ListUsersRequest(page_size=1, page_token=token, **other))
    )
    assert failure.code == INVALID
    assert set(failure.violations) == {"page_token"}
    assert "other filters" in failure.violations["page_token"]


def _deep_token(secret: bytes, *, depth: int = 100_000) -> str:
    """A page token whose payload is JSON `depth` arrays deep, signed with `secret`."""
    payload = b'{"k": ' + b"[" * depth + b"]" * depth + b"}"
    return signed_token(PageTokens(secret), payload)


SERVER_SECRET = Settings().page_token_secret.get_secret_value().encode()  # the tests' server's
BAD_TOKENS = {
    "100k-deep, signed with the server's secret": _deep_token(SERVER_SECRET),
    "100k-deep, unsigned": _deep_token(b"not-the-secret"),
    "150-deep, signed with the server's secret": _deep_token(SERVER_SECRET, depth=150),
    "oversized": "A" * (MAX_TOKEN_LENGTH + 1),
    "forged": _deep_token(b"not-the-secret", depth=1),
}


@pytest.mark.parametrize("token", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
async def test_list_users_refuses_deep_oversized_and_forged_tokens(user_stub, token) -> None:
    failure = await rpc_fails(user_stub.ListUsers(api.ListUsersRequest(page_token=token)))
    assert failure.code == INVALID
    assert set(failure.violations) == {"page_token"}


@pytest.mark.parametrize("token", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
async def test_stream_users_refuses_deep_oversized_and_forged_tokens(user_stub, token) -> None:
    failure = await stream_fails(user_stub.StreamUsers(api.StreamUsersRequest(resume_token=token)))
    assert failure.code == INVALID
    assert set(failure.violations) == {"resume_token"}


async def test_list_users_token_may_change_page_size(user_stub, engine) -> None:
    await bulk_users(engine, 5)
    first = await user_stub.ListUsers(api.ListUsersRequest(page_size=2))
    rest = await user_stub.ListUsers(
        api.ListUsersRequest(page_size=10, page_token=first.next_page_token)
    )
    assert len(rest.users) == 3


async def test_list_users_hides_deleted_unless_asked(user_stub, factory: Factory) -> None:
    live = await factory.user()
    gone = await factory.user(deleted=True)
    default = await list_all(user_stub)
    assert [u.id for u in default] == [live.id]
    everyone = await list_all(user_stub, show_deleted=True, page_size=1)
    assert [u.id for u in everyone] == [live.id, gone.id]
    assert everyone[1].HasField("deleted_at")


async def test_list_users_filters_by_full_name(user_stub, factory: Factory) -> None:
    ada = await factory.user(first_name="Ada", last_name="Lovelace")
    grace = await factory.user(first_name="Grace", last_name="Hopper")
    percent = await factory.user(first_name="100%", last_name="Sure")
    underscore = await factory.user(first_name="snake_case", last_name="Fan")
    await factory.user(first_name="snakeXcase", last_name="Fan")
    await factory.user(first_name="100X", last_name="Sure")
    slash = await factory.user(first_name="Back\\slash", last_name="Fan")

    async def ids(term: str) -> list[int]:
        return [u.id for u in await list_all(user_stub, full_name=term)]

    assert await ids("ADA LOVE") == [ada.id]  # case-insensitive, across the joining space
    assert await ids("a l") == [ada.id]
    assert await ids("hop") == [grace.id]
    assert await ids("%") == [percent.id]
    assert await ids("0% s") == [percent.id]
    assert await ids("_") == [underscore.id]
    assert await ids("e_c") == [underscore.id]
    assert await ids("\\") == [slash.id]
    assert await ids("nobody") == []


@pytest.mark.parametrize("term", ["nul\x00byte", "x" * 202])
async def test_list_users_rejects_unusable_full_name_filter(user_stub, term) -> None:
    failure = await rpc_fails(user_stub.ListUsers(api.ListUsersRequest(full_name=term)))
    assert failure.code == INVALID
    assert set(failure.violations) == {"full_name"}


async def test_list_users_full_name_filter_pages(user_stub, engine) -> None:
    await bulk_users(engine, 12)
    # "User1" matches User1, User10, User11, User12.
    users = await list_all(user_stub, full_name="bulk user1", page_size=2)
    assert sorted(u.last_name for u in users) == ["User1", "User10", "User11", "User12"]


async def test_list_users_include_orders(user_stub, factory: Factory) -> None:
    buyer = await factory.user()
    other = await factory.user()
    first = await factory.order(buyer, items=[("A", 1, "1.50"), ("B", 3, "2.00")])
    second = await factory.order(buyer)
    without = await user_stub.ListUsers(api.ListUsersRequest())
    assert all(len(u.orders) == 0 for u in without.users)
    page = await user_stub.ListUsers(api.ListUsersRequest(include_orders=True))
    by_id = {u.id: u for u in page.users}
    assert [o.id for o in by_id[buyer.id].orders] == [first.id, second.id]
    assert len(by_id[other.id].orders) == 0
    order = by_id[buyer.id].orders[0]
    assert order.user_id == buyer.id
    assert order.total == "7.50"
    assert order.status == pb.ORDER_STATUS_PENDING
    assert [(i.sku, i.quantity, i.unit_price) for i in order.items] == [
        ("A", 1, "1.50"),
        ("B", 3, "2.00"),
    ]


async def test_list_users_include_orders_has_no_n_plus_1(user_stub, engine, statements) -> None:
    await users_with_orders(engine, 30)

    async def statements_for(page_size: int) -> int:
        before = statements.count
        page = await user_stub.ListUsers(
            api.ListUsersRequest(page_size=page_size, include_orders=True)
        )
        assert len(page.users) == page_size
        assert all(len(u.orders) == 1 and len(u.orders[0].items) == 2 for u in page.users)
        return statements.count - before

    small = await statements_for(3)
    large = await statements_for(30)
    # Users, their orders, the orders' items: three whatever the page size.
    assert small == large == 3


# --- StreamUsers -------------------------------------------------------------------------------


async def stream_batches(user_stub, **request: Any) -> list[list[pb.User]]:
    return [list(b.users) async for b in user_stub.StreamUsers(api.StreamUsersRequest(**request))]


@pytest.mark.parametrize("batch_size", [500, 0])
async def test_stream_users_in_batches(user_stub, engine, batch_size) -> None:
    await bulk_users(engine, 1200)
    batches = await stream_batches(user_stub, batch_size=batch_size)
    assert [len(b) for b in batches] == [500, 500, 200]
    ids = [u.id for b in batches for u in b]
    assert ids == sorted(ids)
    assert len(ids) == len(set(ids))
    assert set(ids) == {r.id for r in (await db_users(engine)).values()}
    first = batches[0][0]
    assert first.full_name == f"{first.first_name} {first.last_name}"
    assert first.HasField("created_at") and not first.HasField("deleted_at")


async def test_stream_users_batch_size_is_capped_at_5000(user_stub, engine) -> None:
    await bulk_users(engine, 5001)
    batches = await stream_batches(user_stub, batch_size=100_000)
    assert [len(b) for b in batches] == [5000, 1]


async def test_stream_users_small_batches(user_stub, engine) -> None:
    await bulk_users(engine, 5)
    batches = await stream_batches(user_stub, batch_size=2)
    assert [len(b) for b in batches] == [2, 2, 1]


async def test_stream_users_on_empty_table_sends_nothing(user_stub) -> None:
    assert await stream_batches(user_stub) == []


async def test_stream_users_leaves_pooled_connections_writable(
    database_url: str, engine: AsyncEngine
) -> None:
    """The export's READ ONLY / REPEATABLE READ must not stick to the pooled connection. A pool
    of one connection, so the writes after the export run on the connection it used."""
    async with own_server(database_url, pool_size=1, max_overflow=0) as server:
        backends: list[int] = []  # the server pid of each checkout

        def checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
            backends.append(dbapi_connection.driver_connection.get_server_pid())

        event.listen(server.running.engine.sync_engine.pool, "checkout", checkout)
        await bulk_users(engine, 3)
        stream = server.users.StreamUsers(api.StreamUsersRequest())
        assert len([u async for b in stream for u in b.users]) == 3
        for i in range(10):
            created = await server.users.CreateUser(
                api.CreateUserRequest(email=f"after{i}@example.com", first_name="A", last_name="B")
            )
            assert created.id > 0
        # One connection served the export and every write after it.
        assert len(backends) >= 11 and len(set(backends)) == 1, backends
    assert await user_count(engine) == 13


async def test_stream_users_negative_batch_size_is_invalid(user_stub) -> None:
    failure = await stream_fails(user_stub.StreamUsers(api.StreamUsersRequest(batch_size=-1)))
    assert failure.code == INVALID
    assert failure.domain == "shop.v1"
    assert set(failure.violations) == {"batch_size"}


async def test_stream_users_filters(user_stub, factory: Factory) -> None:
    live = await factory.user()
    inactive = await factory.user(is_active=False)
    deleted = await factory.user(deleted=True)
    deleted_inactive = await factory.user(deleted=True, is_active=False)

    async def ids(**request: Any) -> list[int]:
        return [u.id for b in await stream_batches(user_stub, **request) for u in b]

    assert await ids() == [live.id, inactive.id]
    assert await ids(active_only=True) == [live.id]
    assert await ids(show_deleted=True) == [live.id, inactive.id, deleted.id, deleted_inactive.id]
    assert await ids(show_deleted=True, active_only=True) == [live.id, deleted.id]
    streamed = {u.id: u for b in await stream_batches(user_stub, show_deleted=True) for u in b}
    assert streamed[deleted.id].HasField("deleted_at")
    assert not streamed[inactive.id].is_active


async def test_stream_users_sends_what_get_user_sends(user_stub, factory: Factory, engine) -> None:
    """The stream's converter (epoch microseconds from SQL, fields set in place) gives the same
    bytes as GetUser's (Timestamp.FromDatetime), edge-case instants and unicode included."""
    users = [
        await factory.user(first_name="Zoë", last_name="Ångström"),
        await factory.user(is_active=False),
        await factory.user(deleted=True),
        await factory.user(deleted=True, is_active=False),
    ]
    instants = [
        "1969-12-31 23:59:59.999999+00",
        "0001-01-01 00:00:00+00",
        "1970-01-01 00:00:00+00",
        "9999-12-28 23:59:59.999999+00",
    ]
    async with engine.begin() as conn:
        for user, instant in zip(users, instants, strict=True):
            await conn.execute(
                text(
                    "UPDATE users SET created_at = CAST(CAST(:t AS text) AS timestamptz), "
                    "updated_at = CAST(CAST(:t AS text) AS timestamptz) + interval '1.5 s', "
                    "deleted_at = CASE WHEN deleted_at IS NULL THEN NULL "
                    "ELSE CAST(CAST(:t AS text) AS timestamptz) + interval '2 days 0.000001 s' "
                    "END WHERE id = :id"
                ),
                {"t": instant, "id": user.id},
            )
    streamed = [u for b in await stream_batches(user_stub, show_deleted=True) for u in b]
    assert [u.id for u in streamed] == [u.id for u in users]
    for got in streamed:
        want = await user_stub.GetUser(api.GetUserRequest(id=got.id))
        assert got.SerializeToString(deterministic=True) == want.SerializeToString(
            deterministic=True
        )


# --- UpsertUsers -------------------------------------------------------------------------------


async def test_upsert_users_inserts_and_updates(user_stub, factory: Factory, engine) -> None:
    existing = await factory.user(
        email="ada@example.com", first_name="Ada", last_name="Old", is_active=False
    )
    reply = await user_stub.UpsertUsers(
        api.UpsertUsersRequest(
            users=[
                upsert_user("ADA@example.com", "Ada", "Lovelace"),  # is_active absent: true
                upsert_user("grace@example.com", "Grace", "Hopper", is_active=False),
                upsert_user("alan@example.com", "Alan", "Turing"),
            ]
        )
    )
    assert (reply.inserted, reply.updated) == (2, 1)
    rows = await db_users(engine)
    assert set(rows) == {"ada@example.com", "grace@example.com", "alan@example.com"}
    ada = rows["ada@example.com"]
    assert ada.id == existing.id
    assert (ada.last_name, ada.is_active) == ("Lovelace", True)
    assert ada.updated_at > existing.updated_at
    assert rows["grace@example.com"].is_active is False
    assert rows["alan@example.com"].is_active is True
    # The same batch again: nothing new, everything updated.
    again = await user_stub.UpsertUsers(
        api.UpsertUsersRequest(users=[upsert_user("alan@example.com", "Alan", "M. Turing")])
    )
    assert (again.inserted, again.updated) == (0, 1)
    assert (await db_users(engine))["alan@example.com"].last_name == "M. Turing"


async def test_upsert_users_duplicate_email_in_batch(user_stub, engine) -> None:
    failure = await rpc_fails(
        user_stub.UpsertUsers(
            api.UpsertUsersRequest(
                users=[
                    upsert_user("new@example.com"),
                    upsert_user("dup@example.com"),
                    upsert_user("DUP@example.com"),
                ]
            )
        )
    )
    assert failure.code == INVALID
    assert set(failure.violations) == {"users[2].email"}
    assert "dup@example.com" in failure.violations["users[2].email"]
    assert await user_count(engine) == 0


async def test_upsert_users_validates_every_row(user_stub, engine) -> None:
    failure = await rpc_fails(
        user_stub.UpsertUsers(
            api.UpsertUsersRequest(
                users=[upsert_user("ok@example.com"), upsert_user("bad", "", "x\x00y")]
            )
        )
    )
    assert failure.code == INVALID
    assert set(failure.violations) == {
        "users[1].email",
        "users[1].first_name",
        "users[1].last_name",
    }
    assert await user_count(engine) == 0


async def test_upsert_users_empty_batch_is_invalid(user_stub) -> None:
    failure = await rpc_fails(user_stub.UpsertUsers(api.UpsertUsersRequest()))
    assert failure.code == INVALID
    assert set(failure.violations) == {"users"}


async def test_upsert_users_at_most_1000(user_stub, engine) -> None:
    too_many = [upsert_user(f"u{i}@example.com") for i in range(1001)]
    failure = await rpc_fails(user_stub.UpsertUsers(api.UpsertUsersRequest(users=too_many)))
    assert failure.code == INVALID
    assert set(failure.violations) == {"users"}
    assert await user_count(engine) == 0
    reply = await user_stub.UpsertUsers(api.UpsertUsersRequest(users=too_many[:1000]))
    assert (reply.inserted, reply.updated) == (1000, 0)
    assert await user_count(engine) == 1000


async def test_upsert_users_refuses_soft_deleted_users(user_stub, factory: Factory, engine) -> None:
    await factory.user(email="gone@example.com", first_name="Gone", deleted=True)
    await factory.user(email="live@example.com", first_name="Live")
    failure = await rpc_fails(
        user_stub.UpsertUsers(
            api.UpsertUsersRequest(
                users=[
                    upsert_user("new@example.com"),
                    upsert_user("live@example.com", "Changed"),
                    upsert_user("gone@example.com", "Revived"),
                ]
            )
        )
    )
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "USER_DELETED"
    assert failure.domain == "shop.v1"
    assert "gone@example.com" in failure.metadata["emails"]
    rows = await db_users(engine)
    assert set(rows) == {"gone@example.com", "live@example.com"}
    assert rows["gone@example.com"].first_name == "Gone"
    assert rows["gone@example.com"].deleted_at is not None
    assert rows["live@example.com"].first_name == "Live"


# --- ImportUsers -------------------------------------------------------------------------------


async def test_import_users_in_several_batches(user_stub, factory: Factory, engine) -> None:
    existing = await factory.user(email="ada@example.com", last_name="Old", is_active=False)
    reply = await user_stub.ImportUsers(
        requests(
            [upsert_user(f"u{i}@example.com", "U", f"N{i}") for i in range(300)],
            [],
            [
                upsert_user(f"u{i}@example.com", "U", f"N{i}", is_active=False)
                for i in range(300, 500)
            ],
            [upsert_user("Ada@Example.com", "Ada", "Lovelace")],
        )
    )
    assert reply.imported == 501
    rows = await db_users(engine)
    assert len(rows) == 501
    assert rows["u0@example.com"].last_name == "N0"
    assert rows["u0@example.com"].is_active is True
    assert rows["u499@example.com"].is_active is False
    ada = rows["ada@example.com"]
    assert (ada.id, ada.last_name, ada.is_active) == (existing.id, "Lovelace", True)


async def test_import_users_empty_stream_imports_nothing(user_stub, engine) -> None:
    assert (await user_stub.ImportUsers(requests())).imported == 0
    assert (await user_stub.ImportUsers(requests([], []))).imported == 0
    assert await user_count(engine) == 0


async def test_import_users_bad_row_in_later_batch_writes_nothing(user_stub, engine) -> None:
    failure = await rpc_fails(
        user_stub.ImportUsers(
            requests(
                [upsert_user("a@example.com"), upsert_user("b@example.com")],
                [upsert_user("c@example.com"), upsert_user("not-an-email")],
            )
        )
    )
    assert failure.code == INVALID
    assert set(failure.violations) == {"batch[1].users[1].email"}
    assert await user_count(engine) == 0


async def test_import_users_duplicate_across_batches_writes_nothing(user_stub, engine) -> None:
    failure = await rpc_fails(
        user_stub.ImportUsers(
            requests(
                [upsert_user("a@example.com"), upsert_user("dup@example.com")],
                [upsert_user("b@example.com"), upsert_user("Dup@Example.com")],
            )
        )
    )
    assert failure.code == INVALID
    assert len(failure.violations) == 1
    assert "dup@example.com" in next(iter(failure.violations.values()))
    assert await user_count(engine) == 0


async def test_import_users_duplicate_within_batch(user_stub, engine) -> None:
    failure = await rpc_fails(
        user_stub.ImportUsers(
            requests([upsert_user("x@example.com")], [upsert_user("d@x.io"), upsert_user("d@x.io")])
        )
    )
    assert failure.code == INVALID
    assert set(failure.violations) == {"batch[1].users[1].email"}
    assert await user_count(engine) == 0


async def test_import_users_refuses_soft_deleted_users(user_stub, factory: Factory, engine) -> None:
    await factory.user(email="gone@example.com", first_name="Gone", deleted=True)
    failure = await rpc_fails(
        user_stub.ImportUsers(
            requests([upsert_user("new@example.com")], [upsert_user("gone@example.com", "Back")])
        )
    )
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "USER_DELETED"
    rows = await db_users(engine)
    assert set(rows) == {"gone@example.com"}
    assert rows["gone@example.com"].first_name == "Gone"


async def test_import_users_names_deleted_users_among_updates_and_changes_nothing(
    user_stub, factory: Factory, engine
) -> None:
    await factory.user(email="live@example.com", first_name="Live")
    await factory.user(email="gone@example.com", first_name="Gone", deleted=True)
    failure = await rpc_fails(
        user_stub.ImportUsers(
            requests(
                [upsert_user("new@example.com"), upsert_user("live@example.com", "Changed")],
                [upsert_user("Gone@Example.com", "Back")],
            )
        )
    )
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "USER_DELETED"
    assert failure.metadata["emails"] == "gone@example.com"
    rows = await db_users(engine)
    assert set(rows) == {"live@example.com", "gone@example.com"}
    assert rows["live@example.com"].first_name == "Live"
    assert rows["gone@example.com"].first_name == "Gone"


async def test_import_users_duplicate_of_an_existing_user_is_invalid(
    user_stub, factory: Factory, engine
) -> None:
    # Duplicates are reported before anything else, existing or soft-deleted users included.
    await factory.user(email="ada@example.com", first_name="Ada")
    await factory.user(email="gone@example.com", deleted=True)
    failure = await rpc_fails(
        user_stub.ImportUsers(
            requests(
                [upsert_user("ada@example.com", "New"), upsert_user("gone@example.com")],
                [upsert_user("b@example.com"), upsert_user("Ada@Example.com", "Newer")],
                [upsert_user("GONE@example.com")],
            )
        )
    )
    assert failure.code == INVALID
    assert set(failure.violations) == {"users.email"}
    # Both are named, in email order (the field repeats, so the last one is kept here).
    assert failure.violations["users.email"] == (
        "gone@example.com appears more than once in the import"
    )
    rows = await db_users(engine)
    assert set(rows) == {"ada@example.com", "gone@example.com"}
    assert rows["ada@example.com"].first_name == "Ada"


async def test_import_users_long_stream_of_new_users(user_stub, engine) -> None:
    # Enough messages for the server to read ahead of its COPYs and stage several at once.
    batches = [
        [upsert_user(f"N{b}-{i}@Example.com", " First ", f"Last{i}") for i in range(700)]
        for b in range(30)
    ]
    batches[3][5] = upsert_user("inactive@example.com", is_active=False)
    reply = await user_stub.ImportUsers(requests(*batches))
    assert reply.imported == 30 * 700
    rows = await db_users(engine)
    assert len(rows) == 30 * 700
    assert rows["n29-699@example.com"].first_name == "First"
    assert rows["n0-0@example.com"].is_active is True
    assert rows["inactive@example.com"].is_active is False


async def test_import_users_updates_only(user_stub, factory: Factory, engine) -> None:
    existing = [await factory.user(email=f"u{i}@example.com", last_name="Old") for i in range(3)]
    reply = await user_stub.ImportUsers(
        requests([upsert_user(f"u{i}@example.com", "U", "New") for i in range(3)])
    )
    assert reply.imported == 3
    rows = await db_users(engine)
    assert {(rows[u.email].id, rows[u.email].last_name) for u in existing} == {
        (u.id, "New") for u in existing
    }


async def test_import_users_message_past_its_row_bound_writes_nothing(user_stub, engine) -> None:
    many = [upsert_user(f"m{i}@example.com") for i in range(MAX_MESSAGE_USERS + 1)]
    failure = await rpc_fails(user_stub.ImportUsers(requests([upsert_user("a@example.com")], many)))
    assert failure.code == INVALID
    assert failure.violations == {"batch[1].users": "at most 10,000 users per message"}
    assert await user_count(engine) == 0


async def test_import_users_bad_row_late_in_a_long_stream_writes_nothing(user_stub, engine) -> None:
    batches = [[upsert_user(f"ok{b}-{i}@example.com") for i in range(500)] for b in range(20)]
    batches.append([upsert_user("last@example.com", first="")])
    failure = await rpc_fails(user_stub.ImportUsers(requests(*batches)))
    assert failure.code == INVALID
    assert set(failure.violations) == {"batch[20].users[0].first_name"}
    assert await user_count(engine) == 0


async def test_import_users_cancelled_mid_stream_writes_nothing(
    user_stub, engine, statements
) -> None:
    release = asyncio.Event()

    async def slow_client() -> AsyncIterator[api.ImportUsersRequest]:
        yield api.ImportUsersRequest(users=[upsert_user(f"c{i}@example.com") for i in range(50)])
        await release.wait()  # never set: the client cancels instead
        yield api.ImportUsersRequest(users=[upsert_user("late@example.com")])

    async def import_transactions() -> list[str]:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT state FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL "
                    "AND state = 'idle in transaction'"
                )
            )
            return list(rows.scalars())

    call = user_stub.ImportUsers(slow_client())
    # The first batch is copied (straight into users, in a savepoint): a server connection
    # sits in its transaction, which has written, after the COPY.
    await wait_until(import_transactions, "the first batch to be copied")
    assert any(s.upper().startswith("RELEASE SAVEPOINT") for s in statements.statements)
    assert not any("CREATE TEMP TABLE" in s for s in statements.statements)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert call.cancelled()

    async def rolled_back() -> bool:
        return not await import_transactions()

    await wait_until(rolled_back, "the import transaction to end")
    assert await user_count(engine) == 0
    # The server is still healthy and a fresh import works.
    reply = await user_stub.ImportUsers(requests([upsert_user("after@example.com")]))
    assert reply.imported == 1
    assert set(await db_users(engine)) == {"after@example.com"}
