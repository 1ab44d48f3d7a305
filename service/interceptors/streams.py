"""Response streams driven by the call's own task, so a cancelled stream is closed at once."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

from service.handlers.context import Context
from service.interceptors.wrapping import Handler, WrappingInterceptor


def _written(fn: Callable[..., Any]) -> Callable[..., Awaitable[None]]:
    async def call(request: Any, context: Context) -> None:
        async with aclosing(fn(request, context)) as messages:
            async for message in messages:
                await context.write(message)

    return call


class StreamWriter(WrappingInterceptor):
    """Turns async-generator response streams into handlers that write each message.

    grpc drops a generator whose client went away without closing it; the generator chain
    (interceptors, then the servicer holding a cursor and a transaction) is then only closed when
    the garbage collector finalizes it, after the call has ended. Written here instead, the
    cancellation reaches this coroutine and `aclosing` closes the chain at once, in the call's
    task, while the call is still alive. Install it outermost.
    """

    def wrap(self, method: str, handler: Handler) -> Handler:
        replaced = {
            name: _written(fn)
            for name in ("unary_stream", "stream_stream")
            if inspect.isasyncgenfunction(fn := getattr(handler, name))
        }
        return handler._replace(**replaced) if replaced else handler  # type: ignore[attr-defined]
