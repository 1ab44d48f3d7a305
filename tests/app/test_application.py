"""The application layer driven without a channel, on the real PostgreSQL: what a second
transport would call. Nothing here imports grpc or protobuf; answers the money writer stores
are the test's own bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.app.accounts import Accounts
from service.app.money_rules import Kind, Posted, Posting
from service.app.users import Users
from service.app.users_import import StagedUser
from service.db.database import Database
from service.errors import AlreadyExists, InvalidArgument
from tests.ids import rid


@dataclass(frozen=True)
class Answer:
    """An answer as a transport would encode it: here, plain bytes."""

    data: bytes

    def SerializeToString(self, *, deterministic: bool = False) -> bytes:
        return self.data


@dataclass(frozen=True)
class Request:
    """An idempotent request: its request_id, and what its fingerprint is taken of."""

    request_id: str
    body: bytes

    def SerializeToString(self, *, deterministic: bool = False) -> bytes:
        return self.body


class PlainAnswers:
    def answer(self, posting: Posting, posted: Posted) -> Answer:
        return Answer(f"{posting.kind.value} {posted.account.id} {posted.balance_after}".encode())

    def parse(self, kind: Kind, data: bytes) -> Answer:
        return Answer(data)


@pytest.fixture
def db(engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> Database:
    return Database(engine, sessions)


async def test_a_user_is_created_changed_deleted_and_read_back(db: Database) -> None:
    users = Users(db)
    user = await users.create("ada@example.com", "Ada", "Lovelace")
    assert (await users.update(user.id, {"first_name": "Augusta"})).first_name == "Augusta"
    assert (await users.set_deleted(user.id, deleted=True)).deleted_at is not None
    row = await users.row(user.id)  # GetUser's coalesced read: a row of USER_COLUMNS
    assert (row.email, row.first_name, row.deleted_at is not None) == (
        "ada@example.com",
        "Augusta",
        True,
    )


async def test_an_import_is_exported_in_id_order_and_a_repeat_email_is_refused(
    db: Database,
) -> None:
    users = Users(db)

    async def batches(*records: StagedUser) -> AsyncIterator[list[StagedUser]]:
        for record in records:
            yield [record]

    imported = await users.import_(
        batches(("a@example.com", "A", "One", True), ("b@example.com", "B", "Two", False))
    )
    assert imported == 2
    export = users.export(show_deleted=False, active_only=False, batch_size=1, after_id=0)
    assert [row.email async for rows in export for row in rows] == [
        "a@example.com",
        "b@example.com",
    ]
    with pytest.raises(InvalidArgument) as refused:
        await users.import_(
            batches(("c@example.com", "C", "One", True), ("c@example.com", "C", "Two", True))
        )
    assert [v.field for v in refused.value.violations] == ["users.email"]


async def test_an_import_stages_what_meets_a_taken_email_and_names_a_repeat_among_the_rest(
    db: Database,
) -> None:
    users = Users(db)
    await users.create("taken@example.com", "Old", "Name")

    async def batches(*batches: list[StagedUser]) -> AsyncIterator[list[StagedUser]]:
        for batch in batches:
            yield batch

    # The first batch meets a taken email: it is staged, and the batches after it; "y" is no
    # user's, but twice in the import, which the merge finds.
    with pytest.raises(InvalidArgument) as refused:
        await users.import_(
            batches(
                [("taken@example.com", "New", "Name", True), ("x@example.com", "X", "X", True)],
                [("y@example.com", "Y", "One", True), ("y@example.com", "Y", "Two", True)],
            )
        )
    assert [(v.field, v.description) for v in refused.value.violations] == [
        ("users.email", "y@example.com appears more than once in the import")
    ]
    export = users.export(show_deleted=True, active_only=False, batch_size=10, after_id=0)
    assert [(row.email, row.first_name) async for rows in export for row in rows] == [
        ("taken@example.com", "Old")
    ]
    # Without the repeat, the taken email is updated and the others copied in.
    imported = await users.import_(
        batches(
            [("taken@example.com", "New", "Name", True), ("x@example.com", "X", "X", True)],
            [("y@example.com", "Y", "One", True), ("z@example.com", "Z", "Z", True)],
        )
    )
    assert imported == 4
    export = users.export(show_deleted=True, active_only=False, batch_size=10, after_id=0)
    assert [(row.email, row.first_name) async for rows in export for row in rows] == [
        ("taken@example.com", "New"),
        ("x@example.com", "X"),
        ("y@example.com", "Y"),
        ("z@example.com", "Z"),
    ]


async def test_money_is_posted_once_per_request_id_with_the_callers_answers(
    db: Database,
) -> None:
    user = await Users(db).create("grace@example.com", "Grace", "Hopper")
    accounts = Accounts(db, PlainAnswers())
    opening = Request(rid(), b"open EUR")
    account = await accounts.open(
        user.id,
        "EUR",
        request=opening,
        answer=lambda a: Answer(str(a.id).encode()),
        parse=Answer,
    )
    account_id = int(account.data)
    deposit = Request(rid(), b"deposit 10.00")
    posting = Posting(Kind.DEPOSIT, deposit.request_id, account_id, Decimal("10.00"))
    first = await accounts.post("Deposit", deposit, posting)
    assert first == Answer(f"deposit {account_id} 10.00".encode())
    assert await accounts.post("Deposit", deposit, posting) == first  # the stored answer
    other = Request(deposit.request_id, b"deposit 20.00")
    with pytest.raises(AlreadyExists):
        await accounts.post("Deposit", other, posting)
    assert (await accounts.row(account_id)).balance == Decimal("10.00")
