"""ImportUsers' hot path: the column-wise check gives what row-by-row validation gives, and the
read-ahead pipeline stages everything in order, raises what the stream raised, cancels cleanly."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from shop.v1 import user_service_pb2 as api

from service.api.users_bulk import batch_records, checked_batch, import_batches, user_rows
from service.api.validation import Violations
from service.app.users_import import READ_AHEAD_ROWS, StagedUser, stage_all
from service.errors import InvalidArgument

# Characters that make emails and names valid, invalid or tricky: separators of the column check
# (newline), whitespace and control characters, case folding (İ, Σ), backslashes, dots, @.
_EMAIL_CHARS = ["a", "B", ".", "@", "\n", " ", "\t", "\x00", "\x7f", "é", "İ", "Σ", "\u2028", "\\"]
_NAME_CHARS = ["a", "Z", " ", "\t", "\n", "\x00", "\x1f", "é", "\u3000", "\\", "-"]


def _random_user(rng: random.Random, n: int) -> api.UpsertUser:
    kind = rng.random()
    if kind < 0.7:
        local = "".join(rng.choice("ab.-é") for _ in range(rng.choice([1, 3, 64, 65])))
        domain = rng.choice(["x.io", "a.b.c", "x", "", "x.", ".x", "x.y z"])
        email = f"{local}{n % 5}@{domain}" if rng.random() < 0.9 else "a@x.io"
    else:
        email = "".join(rng.choice(_EMAIL_CHARS) for _ in range(rng.randint(0, 12)))
    names = [
        "".join(rng.choice(_NAME_CHARS) for _ in range(rng.choice([0, 1, 5, 100, 101])))
        if rng.random() < 0.3
        else rng.choice(["Ada", " Ada ", "Lovelace"])
        for _ in range(2)
    ]
    user = api.UpsertUser(email=email, first_name=names[0], last_name=names[1])
    if rng.random() < 0.5:
        user.is_active = rng.random() < 0.5
    return user


def _row_by_row(users: list[api.UpsertUser]) -> tuple[list[StagedUser], list[str]]:
    v = Violations()
    rows = user_rows(v, "users", users)
    return [(r.email, r.first_name, r.last_name, r.is_active) for r in rows], [
        f"{item.field}: {item.description}" for item in v.items
    ]


def test_the_column_check_accepts_exactly_the_batches_valid_row_by_row() -> None:
    rng = random.Random(3)
    accepted = 0
    for _ in range(4000):
        users = [_random_user(rng, n) for n in range(rng.choice([1, 2, 3, 8]))]
        # Round-trip through bytes: the handler sees parsed messages.
        users = list(
            api.ImportUsersRequest.FromString(
                api.ImportUsersRequest(users=users).SerializeToString()
            ).users
        )
        expected, violations = _row_by_row(users)
        records = checked_batch(users)
        assert (records is None) == bool(violations), (users, violations)
        if records is not None:
            accepted += 1
            assert records == expected
    assert accepted > 50  # the sample holds valid batches too


def test_a_large_valid_batch_passes_the_column_check() -> None:
    users = [
        api.UpsertUser(email=f"Ü{i}@Example.COM", first_name=" Ada ", last_name="Love\\lace")
        for i in range(2000)
    ]
    users[7].is_active = False
    users[8].is_active = True
    records = checked_batch(users)
    assert records is not None
    assert records == _row_by_row(users)[0]
    assert records[0] == ("ü0@example.com", "Ada", "Love\\lace", True)
    assert [r[3] for r in records[6:9]] == [True, False, True]


def test_an_invalid_batch_answers_the_row_by_row_violations() -> None:
    users = [
        api.UpsertUser(email="a@x.io", first_name="A", last_name="B"),
        api.UpsertUser(email="not-an-email", first_name=" ", last_name="B"),
        api.UpsertUser(email="A@x.io", first_name="A", last_name="B"),
    ]
    with pytest.raises(InvalidArgument) as caught:
        batch_records("batch[2].users", users)
    fields = [violation.field for violation in caught.value.violations]
    assert fields == [
        "batch[2].users[1].email",
        "batch[2].users[1].first_name",
        "batch[2].users[2].email",
    ]


# "Fast" made a bound: it takes milliseconds; a backtracking regex would take hours. The
# signal method (the default on Linux) interrupts a regex stuck in C, as _sre checks for
# signals; the thread method could not, its timer thread never gets the GIL back.
@pytest.mark.timeout(10, method="signal")
def test_a_pathological_email_column_fails_fast() -> None:
    # Many dots per email: a backtracking regex would re-split them all when the last one fails.
    users = [api.UpsertUser(email="a@b.c.d.e.f.g.h", first_name="A", last_name="B")] * 3000
    users.append(api.UpsertUser(email="a@b.c.d e", first_name="A", last_name="B"))
    assert checked_batch(users) is None


# --- the read-ahead pipeline ---------------------------------------------------------------


def _batch(start: int, size: int) -> list[StagedUser]:
    return [(f"u{i}@x.io", "A", "B", True) for i in range(start, start + size)]


async def _batches(
    sizes: list[int], *, fail_at: int | None = None, gate: asyncio.Event | None = None
) -> AsyncIterator[list[StagedUser]]:
    start = 0
    for n, size in enumerate(sizes):
        if n == fail_at:
            raise InvalidArgument.single(f"batch[{n}]", "is bad")
        if gate is not None and n == 1:
            await gate.wait()
        yield _batch(start, size)
        start += size


async def test_every_batch_is_staged_in_order_and_a_backlog_in_one_call() -> None:
    staged: list[list[StagedUser]] = []

    async def slow_stage(records: list[StagedUser]) -> None:
        staged.append(records)
        await asyncio.sleep(0.02)  # the reader gets ahead meanwhile

    await stage_all(_batches([3, 0, 2, 4, 1]), slow_stage)
    assert [r for call in staged for r in call] == _batch(0, 10)
    assert len(staged) < 4  # the batches read during a COPY went in together


async def test_the_read_ahead_is_bounded() -> None:
    calls: list[int] = []

    async def slow_stage(records: list[StagedUser]) -> None:
        calls.append(len(records))
        await asyncio.sleep(0.01)

    await stage_all(_batches([10] * 20), slow_stage, read_ahead_rows=30)
    assert sum(calls) == 200
    assert max(calls) <= 30


async def test_a_failing_batch_is_raised_after_the_copy_in_flight() -> None:
    staged: list[int] = []

    async def stage(records: list[StagedUser]) -> None:
        await asyncio.sleep(0.01)
        staged.append(len(records))

    with pytest.raises(InvalidArgument):
        await stage_all(_batches([2, 2, 2], fail_at=2), stage)
    assert sum(staged) <= 4


async def test_a_failing_stage_cancels_the_reader() -> None:
    gate = asyncio.Event()  # never set: the reader waits for the second batch forever

    async def failing_stage(records: list[StagedUser]) -> None:
        raise RuntimeError("COPY failed")

    before = asyncio.all_tasks()
    with pytest.raises(RuntimeError, match="COPY failed"):
        await stage_all(_batches([1, 1], gate=gate), failing_stage)
    assert asyncio.all_tasks() == before  # no reader left behind


async def test_cancelling_the_call_cancels_the_reader() -> None:
    gate = asyncio.Event()
    staged = asyncio.Event()

    async def stage(records: list[StagedUser]) -> None:
        staged.set()

    before = asyncio.all_tasks()
    task = asyncio.create_task(stage_all(_batches([1, 1], gate=gate), stage))
    await staged.wait()  # the first batch is in; the reader waits for the client
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert asyncio.all_tasks() == before


async def test_import_batches_names_fields_by_message_number() -> None:
    async def requests() -> AsyncIterator[api.ImportUsersRequest]:
        yield api.ImportUsersRequest(
            users=[api.UpsertUser(email="a@x.io", first_name="A", last_name="B")]
        )
        yield api.ImportUsersRequest()
        yield api.ImportUsersRequest(
            users=[api.UpsertUser(email="bad", first_name="A", last_name="B")]
        )

    got: list[list[StagedUser]] = []
    with pytest.raises(InvalidArgument) as caught:
        async for records in import_batches(requests()):
            got.append(records)
    assert got == [[("a@x.io", "A", "B", True)], []]
    assert [v.field for v in caught.value.violations] == ["batch[2].users[0].email"]


async def test_the_read_ahead_is_16k_rows_by_default() -> None:
    """docs/money.md (Bulk writes): about 16k rows are received and checked ahead of the COPY:
    the reader stops once 16,384 wait, so at most the message that crossed the bound more."""
    calls: list[int] = []

    async def slow_stage(records: list[StagedUser]) -> None:
        calls.append(len(records))
        await asyncio.sleep(0.02)

    await stage_all(_batches([1000] * 60), slow_stage)
    assert READ_AHEAD_ROWS == 16_384
    assert sum(calls) == 60_000
    assert max(calls) < READ_AHEAD_ROWS + 1000
    assert max(calls) > 1000  # it did read ahead: more than one message per COPY
