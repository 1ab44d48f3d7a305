"""Hands each call's deadline to the database layer (service/db/deadlines.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from service.db.deadlines import bind_deadline
from service.handlers.context import Context
from service.interceptors.wrapping import Handler, WrappingInterceptor, with_behaviours


def _unary(fn: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Any, context: Context) -> Any:
        bind_deadline(context.time_remaining())
        return await fn(request, context)

    return call


def _streaming(fn: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Any, context: Context) -> AsyncIterator[Any]:
        bind_deadline(context.time_remaining())
        # aclosing: when this stream is closed (client gone), the servicer's generator is closed
        # now, in this task, rather than whenever the garbage collector finalizes it.
        async with aclosing(fn(request, context)) as messages:
            async for message in messages:
                yield message

    return call


class DeadlineInterceptor(WrappingInterceptor):
    """Binds context.time_remaining() for the call, so every transaction it opens starts with a
    statement_timeout no longer than what the caller still waits."""

    def wrap(self, method: str, handler: Handler) -> Handler:
        return with_behaviours(handler, _unary, _streaming)
