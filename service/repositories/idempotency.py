"""Idempotency keys: request_id -> (hash of the request, stored response)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import IdempotencyKey


@dataclass(frozen=True, slots=True)
class StoredRequest:
    request_hash: bytes
    response: bytes | None


class IdempotencyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def claim(self, request_id: str, request_hash: bytes) -> StoredRequest | None:
        """Insert the key, or return what an earlier committed request stored under it.

        A concurrent transaction holding the same key makes the INSERT wait until it commits
        (then we read its row) or rolls back (then the key is ours): never applied twice."""
        claimed = await self.session.scalar(
            insert(IdempotencyKey)
            .values(request_id=request_id, request_hash=request_hash)
            .on_conflict_do_nothing(index_elements=[IdempotencyKey.request_id])
            .returning(IdempotencyKey.request_id)
        )
        if claimed is not None:
            return None
        row = (
            await self.session.execute(
                select(IdempotencyKey.request_hash, IdempotencyKey.response).where(
                    IdempotencyKey.request_id == request_id
                )
            )
        ).one()
        return StoredRequest(row.request_hash, row.response)

    async def complete(self, request_id: str, response: bytes) -> None:
        await self.session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.request_id == request_id)
            .values(response=response)
        )

    async def purge(self, older_than: datetime) -> int:
        """Forget keys created before `older_than`; returns how many were removed."""
        result = await self.session.execute(
            delete(IdempotencyKey).where(IdempotencyKey.created_at < older_than)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]
