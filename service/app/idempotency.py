"""Run a write once per request_id, in the same transaction as the work."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from service.db.database import Database
from service.errors import AlreadyExists
from service.repositories.idempotency import IdempotencyRepository


class Serializable(Protocol):
    """A response as the transport encodes it (a protobuf message, to the gRPC room)."""

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


M = TypeVar("M", bound=Serializable)


class IdempotentRequest(Protocol):
    """Every idempotent write's request message carries the client's request_id."""

    request_id: str

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


def request_fingerprint(method: str, request: IdempotentRequest) -> bytes:
    return hashlib.sha256(
        method.encode() + b"\0" + request.SerializeToString(deterministic=True)
    ).digest()


async def idempotent(
    db: Database,
    *,
    method: str,
    request: IdempotentRequest,
    parse: Callable[[bytes], M],
    work: Callable[[AsyncSession], Awaitable[M]],
) -> M:
    """Do `work` once per request.request_id, in a retried unit of work (service/db/retry.py).

    The first call stores its response in the same transaction as the work; a repeat with the
    same request returns that response and applies nothing; a repeat with another request (or
    method) is ALREADY_EXISTS / REQUEST_ID_REUSED. On a deadlock or serialization failure the
    claim, the reads and the write all run again, so a retry is applied once too."""
    fingerprint = request_fingerprint(method, request)

    async def attempt(session: AsyncSession) -> M:
        keys = IdempotencyRepository(session)
        return await _once(keys, request.request_id, fingerprint, parse, lambda: work(session))

    return await db.write(attempt)


async def _once(
    keys: IdempotencyRepository,
    request_id: str,
    fingerprint: bytes,
    parse: Callable[[bytes], M],
    work: Callable[[], Awaitable[M]],
) -> M:
    stored = await keys.claim(request_id, fingerprint)
    if stored is not None:
        if stored.request_hash != fingerprint or stored.response is None:
            raise AlreadyExists.request_id_reused(request_id)
        return parse(stored.response)
    response = await work()
    await keys.complete(request_id, response.SerializeToString())
    return response
