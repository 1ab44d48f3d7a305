"""Batches of users for the bulk writes: UpsertUsers' rows checked one by one (the exact field
violations), and ImportUsers' hot path, where each message is checked a column at a time and
turned into COPY records, and the stream is read (and checked) ahead while the records before
it are copied."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

from shop.v1 import user_service_pb2 as api

from service.errors import InvalidArgument
from service.handlers.validation import Violations, all_emails, all_names
from service.repositories.users import UserFields

# A row of the staging table: email (lowercased), first_name, last_name (stripped), is_active.
StagedUser = tuple[str, str, str, bool]

# Rows read and checked ahead of the COPY in flight (give or take a message): what queued up
# meanwhile goes in the next COPY (fewer, larger statements when the client is faster than the
# database), and a client faster still meets grpc's flow control, not an unbounded queue.
READ_AHEAD_ROWS = 16_384
# Users in one ImportUsers message, checked by len() before a row is read: a message is checked
# and turned into records whole, and one 16 MiB message could otherwise hold 8.4M rows. Clients
# send hundreds to thousands (the benchmarks 1000); 10,000 of the longest valid rows are ~21 MB.
MAX_MESSAGE_USERS = 10_000

_FIELDS = attrgetter("email", "first_name", "last_name", "is_active")


def _user_fields(v: Violations, field: str, user: api.UpsertUser) -> UserFields:
    return UserFields(
        email=v.email(f"{field}.email", user.email),
        first_name=v.name(f"{field}.first_name", user.first_name),
        last_name=v.name(f"{field}.last_name", user.last_name),
        is_active=user.is_active if user.HasField("is_active") else True,
    )


def user_rows(v: Violations, field: str, users: list[api.UpsertUser]) -> list[UserFields]:
    """The batch's rows, each field checked, and an email twice in the batch named; the
    violations go to v. The callers bound the batch (MAX_UPSERT_BATCH, MAX_MESSAGE_USERS), and
    with it the rows and the set of emails seen."""
    rows = [_user_fields(v, f"{field}[{i}]", u) for i, u in enumerate(users)]
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if row.email in seen:
            v.add(f"{field}[{i}].email", f"{row.email} appears more than once in the batch")
        seen.add(row.email)
    return rows


def checked_batch(users: Sequence[api.UpsertUser]) -> list[StagedUser] | None:
    """The batch as staging records when every row is valid and no email repeats in it (the
    values user_rows gives), checked a column at a time; None when any check fails: the caller
    then validates row by row, for the exact field violations."""
    if not users:
        return []
    emails, firsts, lasts, actives = zip(*map(_FIELDS, users), strict=True)
    if not all_emails(emails):
        return None
    lowered = list(map(str.lower, emails))
    first_names = list(map(str.strip, firsts))
    last_names = list(map(str.strip, lasts))
    if len(set(lowered)) != len(lowered) or not (all_names(first_names) and all_names(last_names)):
        return None
    if not all(actives):  # absent means true: only a false value needs the presence test
        actives = tuple([a or "is_active" not in u for a, u in zip(actives, users, strict=True)])
    return list(zip(lowered, first_names, last_names, actives, strict=True))


def batch_records(field: str, users: Sequence[api.UpsertUser]) -> list[StagedUser]:
    """The batch's staging records, or INVALID_ARGUMENT with the violations of user_rows."""
    records = checked_batch(users)
    if records is None:
        v = Violations()
        checked = user_rows(v, field, list(users))
        v.raise_if_any()
        records = [(r.email, r.first_name, r.last_name, r.is_active) for r in checked]
    return records


async def import_batches(
    requests: AsyncIterator[api.ImportUsersRequest],
) -> AsyncIterator[list[StagedUser]]:
    """Each message's records, checked; field names count messages from 0 (empty ones too)."""
    batch_no = 0
    async for request in requests:
        field = f"batch[{batch_no}].users"
        if len(request.users) > MAX_MESSAGE_USERS:
            raise InvalidArgument.single(field, f"at most {MAX_MESSAGE_USERS:,} users per message")
        yield batch_records(field, request.users)
        batch_no += 1


@dataclass(frozen=True, slots=True)
class _End:
    """The reader's last word: the stream ended (error None) or failed."""

    error: BaseException | None


async def stage_all(
    batches: AsyncIterator[list[StagedUser]],
    stage: Callable[[list[StagedUser]], Awaitable[None]],
    *,
    read_ahead_rows: int = READ_AHEAD_ROWS,
) -> None:
    """Stage every batch, in order. A reader task receives and checks the next batches while
    `stage` copies the earlier ones, and whatever it queued meanwhile is staged in one call.
    An error of the stream or of a batch is raised here once the COPY in flight is done; when
    this ends early (an error, the call cancelled), the reader is cancelled and awaited.
    When the client pauses, nothing is held back: what arrived is staged."""
    queue: asyncio.Queue[list[StagedUser] | _End] = asyncio.Queue()
    room = asyncio.Event()
    room.set()
    queued = 0

    async def read() -> None:
        nonlocal queued
        try:
            async for records in batches:
                if not records:
                    continue
                queue.put_nowait(records)
                queued += len(records)
                if queued >= read_ahead_rows:
                    room.clear()
                    await room.wait()
        except BaseException as exc:  # the consumer raises it, whatever it is
            queue.put_nowait(_End(exc))
            if not isinstance(exc, Exception):
                raise
        else:
            queue.put_nowait(_End(None))

    reader = asyncio.create_task(read())
    try:
        while True:
            got = [await queue.get()]
            while not queue.empty():
                got.append(queue.get_nowait())
            queued = 0
            room.set()
            end = got[-1] if isinstance(got[-1], _End) else None
            if end is not None and end.error is not None:
                raise end.error
            ready = [records for records in got if not isinstance(records, _End)]
            if ready:
                await stage(ready[0] if len(ready) == 1 else list(chain.from_iterable(ready)))
            if end is not None:
                return
    finally:
        if not reader.done():
            reader.cancel()
            await asyncio.wait([reader])
