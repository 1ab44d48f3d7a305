"""Idempotency keys: request_id -> (hash of the request, stored response)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, bindparam, delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from service.db.models import IdempotencyKey

# Built once, on the table rather than the entity: every idempotent write runs these, and Core
# statements on a Table skip the ORM's bulk insert/update machinery (and the cache key of a
# statement object is computed once).
KEYS = cast(Table, IdempotencyKey.__table__)
CLAIM = (
    insert(KEYS)
    .values(request_id=bindparam("request_id"), request_hash=bindparam("request_hash"))
    .on_conflict_do_nothing(index_elements=[KEYS.c.request_id])
    .returning(KEYS.c.request_id)
)
STORED = select(KEYS.c.request_hash, KEYS.c.response).where(
    KEYS.c.request_id == bindparam("request_id")
)
COMPLETE = (
    update(KEYS).where(KEYS.c.request_id == bindparam("key")).values(response=bindparam("response"))
)


@dataclass(frozen=True, slots=True)
class StoredRequest:
    request_hash: bytes
    response: bytes | None


class IdempotencyRepository:
    """The keys of the session-door writes (OpenAccount, CreateOrder), on the caller's
    transaction. The money writer's batches read and insert theirs in repositories/ledger.py's
    statements (a key inserted once, with its response)."""

    def __init__(self, session: AsyncSession | AsyncConnection) -> None:
        self.session = session

    async def claim(self, request_id: str, request_hash: bytes) -> StoredRequest | None:
        """Insert the key, or return what an earlier committed request stored under it.

        A concurrent transaction holding the same key makes the INSERT wait until it commits
        (then we read its row) or rolls back (then the key is ours): never applied twice."""
        params = {"request_id": request_id, "request_hash": request_hash}
        if await self.session.scalar(CLAIM, params) is not None:
            return None
        row = (await self.session.execute(STORED, {"request_id": request_id})).one()
        return StoredRequest(row.request_hash, row.response)

    async def complete(self, request_id: str, response: bytes) -> None:
        await self.session.execute(COMPLETE, {"key": request_id, "response": response})

    async def purge(self, older_than: datetime) -> int:
        """Forget keys created before `older_than`; returns how many were removed."""
        result = await self.session.execute(
            delete(IdempotencyKey).where(IdempotencyKey.created_at < older_than)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]
