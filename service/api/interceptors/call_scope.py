"""Hands the database layer what it must know of each call: its deadline (service/db/deadlines.py)
and where it reads (its row in service/api/methods.py, bound in service/db/routing.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from service.api.context import Context
from service.api.interceptors.wrapping import Handler, WrappingInterceptor, with_behaviours
from service.api.methods import route_of
from service.db.deadlines import bind_deadline
from service.db.routing import ReadsFrom, bind_reads_from


def _unary(reads_from: ReadsFrom) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: Context) -> Any:
            bind_deadline(context.time_remaining())
            bind_reads_from(reads_from)
            return await fn(request, context)

        return call

    return wrap


def _streaming(reads_from: ReadsFrom) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            bind_deadline(context.time_remaining())
            bind_reads_from(reads_from)
            # aclosing: when this stream is closed (client gone), the servicer's generator is
            # closed now, in this task, rather than whenever the garbage collector finalizes it.
            async with aclosing(fn(request, context)) as messages:
                async for message in messages:
                    yield message

        return call

    return wrap


class CallScopeInterceptor(WrappingInterceptor):
    """Binds context.time_remaining() for the call, so every transaction it opens starts with a
    statement_timeout no longer than what the caller still waits; and where the method reads
    (its row in service/api/methods.py, looked up once per method), for Database.read() and
    snapshot()."""

    def wrap(self, method: str, handler: Handler) -> Handler:
        reads_from = route_of(method)
        return with_behaviours(handler, _unary(reads_from), _streaming(reads_from))
