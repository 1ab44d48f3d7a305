"""Run a write once per request_id, inside the caller's transaction."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.retry import transactional
from service.errors import AlreadyExists
from service.repositories.idempotency import IdempotencyRepository

M = TypeVar("M", bound=Message)


def request_fingerprint(method: str, request: Message) -> bytes:
    return hashlib.sha256(
        method.encode() + b"\0" + request.SerializeToString(deterministic=True)
    ).digest()


async def run_once(
    session: AsyncSession,
    *,
    method: str,
    request: Message,
    request_id: str,
    response_type: type[M],
    work: Callable[[], Awaitable[M]],
) -> M:
    """The first call with request_id does `work` and stores its response in the same
    transaction; a repeat with the same request returns that response and applies nothing; a
    repeat with another request (or method) is ALREADY_EXISTS / REQUEST_ID_REUSED."""
    fingerprint = request_fingerprint(method, request)
    keys = IdempotencyRepository(session)
    stored = await keys.claim(request_id, fingerprint)
    if stored is not None:
        if stored.request_hash != fingerprint or stored.response is None:
            raise AlreadyExists(
                f"request_id {request_id} was used for a different request",
                reason="REQUEST_ID_REUSED",
                request_id=request_id,
            )
        return response_type.FromString(stored.response)
    response = await work()
    await keys.complete(request_id, response.SerializeToString())
    return response


async def idempotent(
    sessions: async_sessionmaker[AsyncSession],
    *,
    method: str,
    request: Message,
    request_id: str,
    response_type: type[M],
    work: Callable[[AsyncSession], Awaitable[M]],
) -> M:
    """run_once in a retried unit of work (service/db/retry.py): on a deadlock or serialization
    failure the claim, the reads and the write all run again, so a retry is applied once too."""

    async def attempt(session: AsyncSession) -> M:
        return await run_once(
            session,
            method=method,
            request=request,
            request_id=request_id,
            response_type=response_type,
            work=lambda: work(session),
        )

    return await transactional(sessions, attempt)
