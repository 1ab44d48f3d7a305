"""Wrap every behaviour of an RpcMethodHandler (unary or streaming) with hooks that run before
the call, on each message it sends, and after it ends however it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from service.api.context import Context
from service.api.interceptors.wrapping import Handler, with_behaviours


class CallHooks:
    """One call's hooks; the defaults do nothing. `before` may abort the call."""

    async def before(self, context: Context) -> None:
        pass

    def sent(self, message: Any) -> None:
        pass

    def after(self, context: Context, error: BaseException | None) -> None:
        pass


def wrap_around(handler: Handler, new_hooks: Callable[[], CallHooks]) -> Handler:
    """The handler with each behaviour run inside a fresh CallHooks."""

    def unary(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: Context) -> Any:
            hooks = new_hooks()
            try:
                await hooks.before(context)
                response = await fn(request, context)
            except BaseException as exc:  # cancellation too: the call ended
                hooks.after(context, exc)
                raise
            hooks.sent(response)
            hooks.after(context, None)
            return response

        return call

    def streaming(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            hooks = new_hooks()
            try:
                await hooks.before(context)
                # aclosing: the inner chain (down to the cursor) closes with this call, never
                # later in a garbage-collector finalizer after the call has ended.
                async with aclosing(fn(request, context)) as messages:
                    async for message in messages:
                        yield message
                        hooks.sent(message)
            except BaseException as exc:  # GeneratorExit and CancelledError included
                hooks.after(context, exc)
                raise
            hooks.after(context, None)

        return call

    return with_behaviours(handler, unary, streaming)
