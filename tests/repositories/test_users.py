"""UserRepository's SQL on a real session against a real PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.models import AuditLog, User, utcnow
from service.errors import AlreadyExists, FailedPrecondition, NotFound
from service.repositories.users import UserFields, UserRepository
from tests.factories import Factory


async def audit_rows(sessions: async_sessionmaker[AsyncSession]) -> list[AuditLog]:
    async with sessions() as session:
        return list((await session.scalars(select(AuditLog).order_by(AuditLog.id))).all())


def fields(email: str, first: str = "Ada", last: str = "Lovelace", active: bool = True) -> Any:
    return UserFields(email=email, first_name=first, last_name=last, is_active=active)


def staged(email: str, first: str = "Ada", last: str = "Lovelace") -> tuple[str, str, str, bool]:
    """A row of the import's staging table, as copy_into_staging takes it."""
    return (email, first, last, True)


# --- the full_name hybrid ----------------------------------------------------------------------


async def test_full_name_is_usable_in_queries(sessions, factory: Factory) -> None:
    ada = await factory.user(first_name="Ada", last_name="Lovelace")
    await factory.user(first_name="Ada", last_name="Byron")
    async with sessions() as session:
        found = (await session.scalars(select(User).where(User.full_name == "Ada Lovelace"))).all()
        assert [u.id for u in found] == [ada.id]
        assert found[0].full_name == "Ada Lovelace"
        names = (await session.scalars(select(User.full_name).order_by(User.full_name))).all()
        assert names == ["Ada Byron", "Ada Lovelace"]
        ilike = await session.scalar(
            select(func.count()).where(User.full_name.ilike("%A LOVE%")).select_from(User)
        )
        assert ilike == 1


# --- add / get / flush -------------------------------------------------------------------------


async def test_add_returns_user_with_server_defaults(sessions) -> None:
    async with sessions() as session, session.begin():
        user = await UserRepository(session).add("ada@example.com", "Ada", "Lovelace")
        assert user.id > 0
        assert user.created_at is not None and user.updated_at is not None
        assert user.is_active is True
        assert user.deleted_at is None
    async with sessions() as session:
        again = await UserRepository(session).get(user.id)
        assert (again.email, again.full_name) == ("ada@example.com", "Ada Lovelace")


async def test_add_with_taken_email_raises_email_taken(sessions, factory: Factory) -> None:
    await factory.user(email="ada@example.com", deleted=True)
    async with sessions() as session, session.begin():
        with pytest.raises(AlreadyExists) as caught:
            await UserRepository(session).add("ada@example.com", "Ada", "Lovelace")
        await session.rollback()
    assert caught.value.reason == "EMAIL_TAKEN"
    assert caught.value.metadata == {"email": "ada@example.com"}


async def test_get_missing_user_raises_not_found(sessions) -> None:
    async with sessions() as session:
        with pytest.raises(NotFound) as caught:
            await UserRepository(session).get(12345)
    assert caught.value.reason == "USER_NOT_FOUND"


async def test_get_live_refuses_deleted_users(sessions, factory: Factory) -> None:
    live = await factory.user()
    gone = await factory.user(deleted=True)
    async with sessions() as session:
        users = UserRepository(session)
        assert (await users.get_live(live.id)).id == live.id
        assert (await users.get(gone.id)).is_deleted
        with pytest.raises(FailedPrecondition) as caught:
            await users.get_live(gone.id)
    assert caught.value.reason == "USER_DELETED"


async def test_updated_at_changes_on_update(sessions, factory: Factory) -> None:
    user = await factory.user(first_name="Ada")
    async with sessions() as session, session.begin():
        loaded = await UserRepository(session).get(user.id, for_update=True)
        loaded.first_name = "Augusta"
        await session.flush()
    async with sessions() as session:
        row = await UserRepository(session).get(user.id)
    assert row.first_name == "Augusta"
    assert row.updated_at > user.updated_at
    assert row.created_at == user.created_at


# --- audit log ---------------------------------------------------------------------------------


async def test_audit_log_records_insert_update_and_soft_delete(sessions) -> None:
    async with sessions() as session, session.begin():
        user = await UserRepository(session).add("ada@example.com", "Ada", "Lovelace")
    async with sessions() as session, session.begin():
        loaded = await UserRepository(session).get(user.id)
        loaded.last_name = "King"
    async with sessions() as session, session.begin():
        loaded = await UserRepository(session).get(user.id)
        loaded.deleted_at = utcnow()
    async with sessions() as session, session.begin():
        loaded = await UserRepository(session).get(user.id)
        loaded.deleted_at = None

    rows = await audit_rows(sessions)
    assert [(r.table_name, r.row_id, r.action) for r in rows] == [
        ("users", user.id, "insert"),
        ("users", user.id, "update"),
        ("users", user.id, "delete"),
        ("users", user.id, "undelete"),
    ]
    inserted, updated, deleted, undeleted = (r.changes for r in rows)
    assert inserted["email"] == "ada@example.com"
    assert inserted["first_name"] == "Ada"
    assert updated["last_name"] == "King"
    assert "updated_at" in updated
    assert "email" not in updated
    assert deleted["deleted_at"] is not None
    assert undeleted["deleted_at"] is None


async def test_audit_log_rolls_back_with_the_transaction(sessions) -> None:
    async with sessions() as session, session.begin():
        await UserRepository(session).add("ada@example.com", "Ada", "Lovelace")
        assert await session.scalar(select(func.count()).select_from(AuditLog)) == 1
        await session.rollback()
    assert await audit_rows(sessions) == []


async def test_a_flush_without_changes_writes_no_audit_row(sessions, factory: Factory) -> None:
    user = await factory.user(first_name="Ada")
    async with sessions() as session, session.begin():
        loaded = await UserRepository(session).get(user.id)
        loaded.first_name = "Ada"  # same value: no UPDATE, no audit row
    async with sessions() as session:
        unchanged = await UserRepository(session).get(user.id)
    assert [r.action for r in await audit_rows(sessions)] == ["insert"]  # the factory's
    assert unchanged.updated_at == user.updated_at


async def test_bulk_upsert_is_not_audited(sessions) -> None:
    async with sessions() as session, session.begin():
        await UserRepository(session).upsert([fields("ada@example.com")])
    assert await audit_rows(sessions) == []


# --- page --------------------------------------------------------------------------------------


async def page(sessions, **kw: Any) -> list[User]:
    args = {
        "after_id": 0,
        "limit": 50,
        "show_deleted": False,
        "full_name": "",
        "include_orders": False,
    }
    async with sessions() as session:
        return list(await UserRepository(session).page(**{**args, **kw}))


async def test_page_is_keyset_in_id_order(sessions, factory: Factory) -> None:
    users = [await factory.user() for _ in range(5)]
    ids = [u.id for u in users]
    assert [u.id for u in await page(sessions, limit=2)] == ids[:2]
    assert [u.id for u in await page(sessions, after_id=ids[1], limit=2)] == ids[2:4]
    assert [u.id for u in await page(sessions, after_id=ids[4])] == []


async def test_page_filters(sessions, factory: Factory) -> None:
    ada = await factory.user(first_name="Ada", last_name="Lovelace")
    gone = await factory.user(first_name="Ada", last_name="Gone", deleted=True)
    odd = await factory.user(first_name="50%_off", last_name="Deal")
    await factory.user(first_name="50XYoff", last_name="Deal")
    assert [u.id for u in await page(sessions, full_name="ada")] == [ada.id]
    assert [u.id for u in await page(sessions, full_name="ada", show_deleted=True)] == [
        ada.id,
        gone.id,
    ]
    assert [u.id for u in await page(sessions, full_name="%_")] == [odd.id]


async def test_page_include_orders_loads_orders_and_items(sessions, factory: Factory) -> None:
    buyer = await factory.user()
    order = await factory.order(buyer, items=[("A", 1, "1.00"), ("B", 2, "2.00")])
    users = await page(sessions, include_orders=True)
    # The session is closed: these reads would raise if they were not loaded eagerly.
    assert [o.id for o in users[0].orders] == [order.id]
    assert [i.sku for i in users[0].orders[0].items] == ["A", "B"]


# --- stream ------------------------------------------------------------------------------------


async def test_stream_yields_core_rows_in_batches(sessions, factory: Factory) -> None:
    users = [await factory.user(is_active=i % 2 == 0) for i in range(5)]
    await factory.user(deleted=True)
    async with sessions() as session:
        repo = UserRepository(session)
        batches = [
            list(b) async for b in repo.stream(show_deleted=False, active_only=False, batch_size=2)
        ]
        active = [
            list(b) async for b in repo.stream(show_deleted=False, active_only=True, batch_size=10)
        ]
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [r.id for b in batches for r in b] == [u.id for u in users]
    assert [r.id for b in active for r in b] == [users[0].id, users[2].id, users[4].id]


# --- upsert ------------------------------------------------------------------------------------


async def test_upsert_counts_inserts_and_updates(sessions, factory: Factory) -> None:
    existing = await factory.user(email="ada@example.com", last_name="Old")
    async with sessions() as session, session.begin():
        counts = await UserRepository(session).upsert(
            [fields("zed@example.com"), fields("ada@example.com", last="New", active=False)]
        )
    assert (counts.inserted, counts.updated) == (1, 1)
    async with sessions() as session:
        ada = await UserRepository(session).get(existing.id)
    assert (ada.last_name, ada.is_active) == ("New", False)
    assert ada.updated_at > existing.updated_at


async def test_upsert_of_nothing_is_zero(sessions) -> None:
    async with sessions() as session, session.begin():
        counts = await UserRepository(session).upsert([])
    assert (counts.inserted, counts.updated) == (0, 0)


async def test_upsert_refuses_deleted_users(sessions, factory: Factory) -> None:
    await factory.user(email="gone@example.com", deleted=True)
    async with sessions() as session, session.begin():
        with pytest.raises(FailedPrecondition) as caught:
            await UserRepository(session).upsert(
                [fields("new@example.com"), fields("gone@example.com")]
            )
        await session.rollback()
    assert caught.value.reason == "USER_DELETED"
    assert caught.value.metadata == {"emails": "gone@example.com"}
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(User)) == 1


# --- COPY import -------------------------------------------------------------------------------


async def test_copy_stage_and_merge(sessions, factory: Factory) -> None:
    existing = await factory.user(email="ada@example.com", last_name="Old")
    async with sessions() as session, session.begin():
        repo = UserRepository(session)
        await repo.copy_into_staging([staged("a@example.com"), staged("b@example.com")], first=True)
        await repo.copy_into_staging([staged("ada@example.com", last="New")], first=False)
        assert await repo.staged_duplicates() == []
        assert await repo.merge_staging(staged=3) == 3
    async with sessions() as session:
        emails = (await session.scalars(select(User.email).order_by(User.email))).all()
        ada = await UserRepository(session).get(existing.id)
    assert emails == ["a@example.com", "ada@example.com", "b@example.com"]
    assert ada.last_name == "New"


async def test_staged_duplicates_are_reported(sessions) -> None:
    async with sessions() as session, session.begin():
        repo = UserRepository(session)
        await repo.copy_into_staging([staged("d@example.com"), staged("e@example.com")], first=True)
        await repo.copy_into_staging([staged("d@example.com")], first=False)
        assert await repo.staged_duplicates() == ["d@example.com"]
        await session.rollback()


async def test_merge_refuses_deleted_users(sessions, factory: Factory) -> None:
    await factory.user(email="gone@example.com", deleted=True)
    async with sessions() as session, session.begin():
        repo = UserRepository(session)
        await repo.copy_into_staging([staged("gone@example.com")], first=True)
        with pytest.raises(FailedPrecondition) as caught:
            await repo.merge_staging(staged=1)
        await session.rollback()
    assert caught.value.reason == "USER_DELETED"
