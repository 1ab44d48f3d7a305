"""ImportUsers' two paths over a real channel on a real PostgreSQL: batches COPYed straight into
users (each in a savepoint) until one meets a taken email; that batch and the ones after it
are staged and merged at the end. The client sends each batch once the server is done with the
one before, so each is its own COPY and the test knows which path it took."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from shop.v1 import change_feed_service_pb2 as cf
from shop.v1 import change_feed_service_pb2_grpc as cf_grpc
from shop.v1 import user_service_pb2 as api

import service.app.users_import
from tests.changes.helpers import Watcher
from tests.conftest import StatementCounter
from tests.factories import Factory
from tests.handlers.test_users import db_users, upsert_user, user_count
from tests.rpc import rpc_fails

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _copied(statements: StatementCounter) -> int:
    """Batches copied straight in so far (their savepoints released)."""
    return sum(s.upper().startswith("RELEASE SAVEPOINT") for s in statements.statements)


def _fell_back(statements: StatementCounter) -> bool:
    """A batch met a taken email (or the straight copies their bound): from it on, the
    import stages."""
    return any(
        s.upper().startswith(("ROLLBACK TO SAVEPOINT", "CREATE TEMP TABLE"))
        for s in statements.statements
    )


async def paced(
    statements: StatementCounter, *batches: list[api.UpsertUser]
) -> AsyncIterator[api.ImportUsersRequest]:
    """One message per batch, each sent once the server copied the one before straight in
    (or fell back to staging, after which nothing is copied straight in)."""
    for n, batch in enumerate(batches):
        for _ in range(400):
            if not n or _copied(statements) >= n or _fell_back(statements):
                break
            await asyncio.sleep(0.025)
        else:
            pytest.fail(f"batch {n} was not copied within 10 s: {statements.statements}")
        yield api.ImportUsersRequest(users=batch)


def _news(prefix: str, count: int) -> list[api.UpsertUser]:
    return [upsert_user(f"{prefix}{i}@example.com", "New", f"N{i}") for i in range(count)]


def _merges(statements: StatementCounter) -> list[str]:
    return [
        "ON CONFLICT" if "ON CONFLICT" in s.upper() else "plain"
        for s in statements.statements
        if s.lstrip().upper().startswith("INSERT INTO USERS")
    ]


async def test_new_batches_go_straight_in_and_a_later_existing_email_is_merged(
    user_stub, factory: Factory, engine, statements: StatementCounter
) -> None:
    ada = await factory.user(email="ada@example.com", last_name="Old", is_active=False)
    bob = await factory.user(email="bob@example.com", last_name="Old")
    reply = await user_stub.ImportUsers(
        paced(
            statements,
            _news("a", 100),
            _news("b", 100),
            [upsert_user("c0@example.com"), upsert_user("Ada@Example.com", "Ada", "Lovelace")],
            [upsert_user("bob@example.com", "Bob", "New", is_active=False), *_news("d", 50)],
        )
    )
    assert reply.imported == 100 + 100 + 2 + 51
    # Two batches, then the merge's own savepoint: from the taken email on, all is staged.
    assert _copied(statements) == 2 + 1
    assert _merges(statements) == ["ON CONFLICT"], statements.statements
    rows = await db_users(engine)
    assert len(rows) == 2 + 100 + 100 + 1 + 50
    assert rows["a99@example.com"].last_name == "N99"
    assert rows["b0@example.com"].is_active is True
    assert (rows["ada@example.com"].id, rows["ada@example.com"].last_name) == (ada.id, "Lovelace")
    assert rows["ada@example.com"].is_active is True
    assert (rows["bob@example.com"].id, rows["bob@example.com"].is_active) == (bob.id, False)
    assert rows["d49@example.com"].first_name == "New"
    # Straight in, in the order sent: the rows copied first have the smaller ids.
    assert rows["a0@example.com"].id < rows["b0@example.com"].id < rows["c0@example.com"].id


async def test_an_email_copied_straight_in_and_staged_later_is_invalid_and_nothing_applied(
    user_stub, factory: Factory, engine, statements: StatementCounter
) -> None:
    await factory.user(email="ada@example.com", first_name="Ada")
    failure = await rpc_fails(
        user_stub.ImportUsers(
            paced(
                statements,
                [upsert_user("a@example.com"), upsert_user("dup@example.com")],
                [upsert_user("ada@example.com", "Changed")],  # taken: staged from here on
                [upsert_user("b@example.com"), upsert_user("Dup@Example.com")],
            )
        )
    )
    assert failure.code == INVALID
    assert failure.violations == {
        "users.email": "dup@example.com appears more than once in the import"
    }
    assert _copied(statements) >= 1 and _fell_back(statements)
    rows = await db_users(engine)
    assert set(rows) == {"ada@example.com"}
    assert rows["ada@example.com"].first_name == "Ada"


async def test_an_email_repeated_by_a_later_batch_is_invalid_and_nothing_applied(
    user_stub, engine, statements: StatementCounter
) -> None:
    # The second batch meets only the first one's row: it is staged, and the merge finds the
    # email copied straight in by this import.
    failure = await rpc_fails(
        user_stub.ImportUsers(
            paced(
                statements,
                [upsert_user("a@example.com"), upsert_user("dup@example.com")],
                [upsert_user("DUP@example.com"), upsert_user("c@example.com")],
            )
        )
    )
    assert failure.code == INVALID
    assert failure.violations == {
        "users.email": "dup@example.com appears more than once in the import"
    }
    assert _fell_back(statements)
    assert await user_count(engine) == 0


async def test_a_soft_deleted_user_in_a_later_batch_is_refused_and_nothing_applied(
    user_stub, factory: Factory, engine, statements: StatementCounter
) -> None:
    await factory.user(email="gone@example.com", first_name="Gone", deleted=True)
    await factory.user(email="live@example.com", first_name="Live")
    failure = await rpc_fails(
        user_stub.ImportUsers(
            paced(
                statements,
                _news("n", 20),
                [upsert_user("live@example.com", "Changed"), *_news("m", 5)],
                [upsert_user("Gone@Example.com", "Back")],
            )
        )
    )
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "USER_DELETED")
    assert failure.metadata["emails"] == "gone@example.com"
    rows = await db_users(engine)
    assert set(rows) == {"gone@example.com", "live@example.com"}
    assert rows["gone@example.com"].first_name == "Gone"
    assert rows["live@example.com"].first_name == "Live"


async def test_past_the_straight_copies_bound_the_rest_is_staged_and_inserted_plainly(
    user_stub, engine, statements: StatementCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service.app.users_import, "MAX_STRAIGHT_COPIES", 2)
    reply = await user_stub.ImportUsers(
        paced(statements, _news("a", 10), _news("b", 10), _news("c", 10), _news("d", 10))
    )
    assert reply.imported == 40
    assert _merges(statements) == ["plain"], statements.statements
    assert await user_count(engine) == 40

    # A repeat of a row copied straight in fails the plain INSERT; the merge names it.
    statements.statements.clear()
    failure = await rpc_fails(
        user_stub.ImportUsers(
            paced(statements, _news("e", 3), _news("f", 3), [upsert_user("e1@example.com")])
        )
    )
    assert failure.code == INVALID
    assert failure.violations == {
        "users.email": "e1@example.com appears more than once in the import"
    }
    assert _merges(statements) == ["plain", "ON CONFLICT"], statements.statements
    assert await user_count(engine) == 40


async def test_the_change_feed_sees_every_imported_user_once(
    user_stub, channel: grpc.aio.Channel, factory: Factory, statements: StatementCounter
) -> None:
    existing = await factory.user(email="ada@example.com", last_name="Old")
    feed = cf_grpc.ChangeFeedServiceStub(channel)
    watcher = Watcher(feed, cf.WatchChangesRequest(resource_types=[cf.RESOURCE_TYPE_USER]))
    try:
        await watcher.until(lambda w: w.responses, "the first response")
        # A failed import (a repeat across a straight and a staged batch) logs nothing.
        await rpc_fails(
            user_stub.ImportUsers(
                paced(statements, _news("x", 30), [upsert_user("x3@example.com")])
            )
        )
        statements.statements.clear()
        reply = await user_stub.ImportUsers(
            paced(
                statements,
                _news("a", 300),
                _news("b", 1200),  # more than a changes row holds (1000)
                [upsert_user("ada@example.com", "Ada", "New"), *_news("c", 10)],
                _news("d", 10),
            )
        )
        assert reply.imported == 300 + 1200 + 11 + 10
        await watcher.until(lambda w: len(w.changes) >= reply.imported, "every imported user")
        # A write after the import: once it is seen, nothing else from before can come.
        await factory.user(email="last@example.com")
        await watcher.until(lambda w: w.changes[-1].user.email == "last@example.com", "the last")
        changes = watcher.changes[:-1]
        seen = [(c.user.email, c.operation, c.version) for c in changes]
        assert len(seen) == len({email for email, _, _ in seen}) == reply.imported
        assert ("ada@example.com", cf.OPERATION_UPDATED, 2) in seen
        assert {c.user.id for c in changes if c.user.email == "ada@example.com"} == {existing.id}
        created = {
            email for email, op, version in seen if (op, version) == (cf.OPERATION_CREATED, 1)
        }
        assert created == {
            f"{p}{i}@example.com"
            for p, n in (("a", 300), ("b", 1200), ("c", 10), ("d", 10))
            for i in range(n)
        }
        assert not any(email.startswith("x") for email, _, _ in seen)
    finally:
        await watcher.close()
