"""WatchChanges over a real gRPC channel to a real server, on a real PostgreSQL: what a watcher
receives for writes made through the service and in SQL, across resumes, and when
transactions commit in another order than they began."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from shop.v1 import change_feed_service_pb2 as cf
from shop.v1 import change_feed_service_pb2_grpc as cf_grpc
from shop.v1 import resources_pb2 as pb
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.changes.helpers import Watcher, change_id
from tests.rpc import stream_fails

USER = cf.RESOURCE_TYPE_USER
CREATED, UPDATED, DELETED, SNAPSHOT = (
    cf.OPERATION_CREATED,
    cf.OPERATION_UPDATED,
    cf.OPERATION_DELETED,
    cf.OPERATION_SNAPSHOT,
)


@pytest.fixture(scope="session")
def feed_stub(channel: grpc.aio.Channel) -> cf_grpc.ChangeFeedServiceStub:
    return cf_grpc.ChangeFeedServiceStub(channel)


@pytest.fixture
async def watch(feed_stub: cf_grpc.ChangeFeedServiceStub) -> AsyncIterator[Any]:
    watchers: list[Watcher] = []

    async def start(**fields: Any) -> Watcher:
        watcher = Watcher(feed_stub, cf.WatchChangesRequest(**fields))
        watchers.append(watcher)
        return watcher

    yield start
    for watcher in watchers:
        await watcher.close()


async def _started(watcher: Watcher) -> str:
    """The first response of a NOW stream: caught up, with a token."""
    await watcher.until(lambda w: w.responses, "first response")
    first = watcher.responses[0]
    assert first.event == cf.CHANGE_FEED_EVENT_CAUGHT_UP and not first.changes
    assert first.resume_token
    return first.resume_token


async def test_every_user_write_arrives_once_in_order_with_its_version(
    watch: Any, user_stub: user_service_pb2_grpc.UserServiceStub
) -> None:
    watcher = await watch(resource_types=[USER])
    await _started(watcher)
    user = await user_stub.CreateUser(
        api.CreateUserRequest(email="ada@example.com", first_name="Ada", last_name="L")
    )
    await user_stub.UpdateUser(
        api.UpdateUserRequest(
            user=pb.User(id=user.id, first_name="Augusta"),
            update_mask=FieldMask(paths=["first_name"]),
        )
    )
    await user_stub.DeleteUser(api.DeleteUserRequest(id=user.id))
    await user_stub.UndeleteUser(api.UndeleteUserRequest(id=user.id))
    changes = await watcher.changes_at_least(4)
    assert [(c.operation, c.version) for c in changes] == [
        (CREATED, 1),
        (UPDATED, 2),
        (DELETED, 3),
        (UPDATED, 4),
    ]
    assert [c.sequence for c in changes] == sorted({c.sequence for c in changes})
    assert changes[0].user == user  # the resource as it was right after the change
    assert changes[1].user.first_name == "Augusta"
    assert changes[2].user.HasField("deleted_at") and not changes[3].user.HasField("deleted_at")


async def test_sql_outside_the_service_arrives_and_a_rollback_does_not(
    watch: Any, engine: AsyncEngine
) -> None:
    watcher = await watch(resource_types=[USER])
    await _started(watcher)
    async with engine.connect() as conn:
        async with conn.begin():
            await conn.execute(
                text("INSERT INTO users (email, first_name, last_name) VALUES ('r@x.io', 'R', 'R')")
            )
            await conn.rollback()
        async with conn.begin():
            await conn.execute(
                text("INSERT INTO users (email, first_name, last_name) VALUES ('c@x.io', 'C', 'C')")
            )
        async with conn.begin():
            await conn.execute(text("UPDATE users SET last_name = 'D' WHERE email = 'c@x.io'"))
    changes = await watcher.changes_at_least(2)
    assert [(c.user.email, c.operation, c.version) for c in changes] == [
        ("c@x.io", CREATED, 1),
        ("c@x.io", UPDATED, 2),
    ]


async def test_a_resumed_stream_continues_right_after_its_token(
    watch: Any, user_stub: user_service_pb2_grpc.UserServiceStub
) -> None:
    watcher = await watch(resource_types=[USER], max_batch_size=1)
    await _started(watcher)
    for n in range(3):
        await user_stub.CreateUser(
            api.CreateUserRequest(email=f"u{n}@example.com", first_name="U", last_name="U")
        )
    await watcher.changes_at_least(3)
    await watcher.close()
    # Resume from the token of the second change's response.
    token = next(
        r.resume_token
        for r in watcher.responses
        if r.changes and r.changes[0].user.email == "u1@example.com"
    )
    last_sequence = watcher.changes[1].sequence
    for n in range(3, 5):
        await user_stub.CreateUser(
            api.CreateUserRequest(email=f"u{n}@example.com", first_name="U", last_name="U")
        )
    resumed = await watch(resource_types=[USER], resume_token=token)
    changes = await resumed.changes_at_least(3)
    await asyncio.sleep(0.3)  # nothing more may come
    assert [c.user.email for c in resumed.changes] == [
        "u2@example.com",
        "u3@example.com",
        "u4@example.com",
    ]
    assert [c.sequence for c in changes] == [
        last_sequence + 1,
        last_sequence + 2,
        last_sequence + 3,
    ]


async def test_a_snapshot_then_the_changes_after_it(
    watch: Any, user_stub: user_service_pb2_grpc.UserServiceStub
) -> None:
    for n in range(5):
        await user_stub.CreateUser(
            api.CreateUserRequest(email=f"s{n}@example.com", first_name="S", last_name="S")
        )
    watcher = await watch(
        resource_types=[USER], start_position=cf.START_POSITION_SNAPSHOT, max_batch_size=2
    )
    await watcher.until(
        lambda w: any(r.event == cf.CHANGE_FEED_EVENT_SNAPSHOT_DONE for r in w.responses),
        "SNAPSHOT_DONE",
    )
    snapshot = watcher.changes
    assert [(c.operation, c.version) for c in snapshot] == [(SNAPSHOT, 1)] * 5
    assert [len(r.changes) for r in watcher.responses] == [2, 2, 1]
    await user_stub.DeleteUser(api.DeleteUserRequest(id=snapshot[0].user.id))
    changes = await watcher.changes_at_least(6)
    assert (changes[5].operation, changes[5].version, changes[5].user.id) == (
        DELETED,
        2,
        snapshot[0].user.id,
    )
    assert [c.sequence for c in changes] == list(range(1, 7))


async def _insert_user(conn: Any, email: str) -> int:
    return int(
        (
            await conn.execute(
                text(
                    "INSERT INTO users (email, first_name, last_name) "
                    "VALUES (:e, 'X', 'X') RETURNING id"
                ),
                {"e": email},
            )
        ).scalar_one()
    )


async def test_a_transaction_that_began_first_and_commits_last_is_neither_lost_nor_reordered(
    watch: Any, engine: AsyncEngine
) -> None:
    """A takes its xid first (an insert), B then changes user 1 and commits, the watcher sees
    B's change; only then A changes user 1 too and commits. The feed must hand out A's insert
    (whose change was written before B's) and, for user 1, B's version 2 before A's version 3."""
    async with engine.connect() as setup, setup.begin():
        one = await _insert_user(setup, "one@x.io")
    watcher = await watch(resource_types=[USER])
    await _started(watcher)
    async with engine.connect() as a, engine.connect() as b:
        await a.begin()
        early = await _insert_user(a, "early@x.io")  # A's xid and change row come first
        async with b.begin():
            await b.execute(text("UPDATE users SET last_name = 'B' WHERE id = :id"), {"id": one})
        await watcher.until(lambda w: len(w.changes) >= 1, "B's change")
        await a.execute(text("UPDATE users SET last_name = 'A' WHERE id = :id"), {"id": one})
        await a.commit()
    changes = await watcher.changes_at_least(3)
    await asyncio.sleep(0.3)
    assert [(change_id(c), c.version, c.user.last_name) for c in watcher.changes] == [
        (one, 2, "B"),
        (early, 1, "X"),
        (one, 3, "A"),
    ]
    assert [c.sequence for c in changes] == sorted(c.sequence for c in changes)


async def test_bad_requests_are_invalid_argument(feed_stub: cf_grpc.ChangeFeedServiceStub) -> None:
    cases: Sequence[tuple[cf.WatchChangesRequest, str]] = [
        (cf.WatchChangesRequest(resource_types=[7]), "resource_types[0]"),
        (cf.WatchChangesRequest(max_batch_size=1001), "max_batch_size"),
        (
            cf.WatchChangesRequest(resume_token="x", start_position=cf.START_POSITION_NOW),
            "start_position",
        ),
        (cf.WatchChangesRequest(resume_token="garbled.token"), "resume_token"),
    ]
    for request, field in cases:
        failure = await stream_fails(feed_stub.WatchChanges(request))
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in failure.violations, (field, failure.violations)


async def test_a_token_for_other_resource_types_is_refused(
    watch: Any, feed_stub: cf_grpc.ChangeFeedServiceStub
) -> None:
    watcher = await watch(resource_types=[USER])
    token = await _started(watcher)
    failure = await stream_fails(
        feed_stub.WatchChanges(
            cf.WatchChangesRequest(resource_types=[cf.RESOURCE_TYPE_ORDER], resume_token=token)
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "resume_token" in failure.violations


async def test_a_long_bulk_transaction_holds_back_only_its_own_changes_and_loses_none(
    watch: Any, engine: AsyncEngine
) -> None:
    """A backfill-sized transaction (5,000 users in 5 statements) stays open while small
    transactions commit beside it: the watcher gets each of those as it commits (the open one
    is in every snapshot's in-progress list, so nothing waits for it), then, once it commits,
    all 5,000 of its changes, once each."""
    watcher = await watch(resource_types=[USER], max_batch_size=1000)
    await _started(watcher)
    async with engine.connect() as bulk:
        await bulk.begin()
        for first in range(0, 5000, 1000):
            await bulk.execute(
                text(
                    "INSERT INTO users (email, first_name, last_name) "
                    "SELECT 'bulk' || g || '@x.io', 'B', 'B' "
                    "FROM generate_series(CAST(:a AS int), CAST(:a AS int) + 999) g"
                ),
                {"a": first},
            )
        small = []
        for n in range(3):
            async with engine.connect() as conn, conn.begin():
                small.append(await _insert_user(conn, f"small{n}@x.io"))
            await watcher.until(lambda w, n=n: len(w.changes) >= n + 1, f"small change {n}")
        assert [change_id(c) for c in watcher.changes] == small  # none of the open one's yet
        await bulk.commit()
    changes = await watcher.changes_at_least(3 + 5000)
    bulk_emails = [c.user.email for c in changes[3:]]
    assert sorted(bulk_emails) == sorted(f"bulk{g}@x.io" for g in range(5000))
    assert [c.sequence for c in changes] == list(range(1, len(changes) + 1))
