"""Batches of users for the bulk writes, as they come off the wire: UpsertUsers' rows checked
one by one (the exact field violations), and ImportUsers' hot path, where each message is
checked a column at a time and turned into COPY records (service/app/users_import.py reads the
stream ahead while the records before it are copied)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from operator import attrgetter

from shop.v1 import user_service_pb2 as api

from service.api.validation import Violations, all_emails, all_names
from service.app.users import UserFields
from service.app.users_import import StagedUser
from service.errors import InvalidArgument

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
