"""Wrap every behaviour of an RpcMethodHandler (unary or streaming) with one async hook."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import grpc

from service.handlers.context import Context

if TYPE_CHECKING:  # generic only in the type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    Interceptor = grpc.aio.ServerInterceptor
# Called with the exception a behaviour raised and its context; must raise.
OnError = Callable[[BaseException, Context], Awaitable[None]]


def wrap_handler(handler: Handler, on_error: OnError) -> Handler:
    def unary(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: Context) -> Any:
            try:
                return await fn(request, context)
            except Exception as exc:
                await on_error(exc, context)
                raise

        return call

    def streaming(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                # aclosing: a closed stream (client gone) closes the inner one now, not at GC.
                async with aclosing(fn(request, context)) as messages:
                    async for message in messages:
                        yield message
            except Exception as exc:
                await on_error(exc, context)
                raise

        return call

    replaced: dict[str, Any] = {}
    for name, wrap in (
        ("unary_unary", unary),
        ("stream_unary", unary),
        ("unary_stream", streaming),
        ("stream_stream", streaming),
    ):
        fn = getattr(handler, name)
        if fn is not None:
            replaced[name] = wrap(fn)
    return handler._replace(**replaced)  # type: ignore[attr-defined, no-any-return]
