"""The shutdown interceptor: it tracks response streams so that, when the server stops, each
one ends at once with UNAVAILABLE "server shutting down" instead of running out the grace period
(unary calls keep their grace and finish), and refuses calls that start after that. The stop
signals that set it off are the serving room's (service/serving/shutdown.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from service.api.context import Context
from service.api.interceptors.wrapping import Handler, WrappingInterceptor

SHUTTING_DOWN = "server shutting down"
# A write that takes longer than this was held by flow control: its reader is behind, and a
# proxy in between may hold that stream's bytes. A write with room in its window is done within
# a turn or two of the loop; a busy loop mistaken for a slow reader costs only a longer stop.
HELD_BACK = 0.02
_END = object()  # what a step returns when the stream is exhausted


async def _refuse(request: Any, context: Context) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)


async def _next(messages: AsyncIterator[Any]) -> Any:
    try:
        return await anext(messages)
    except StopAsyncIteration:
        return _END


class ActiveStreams(WrappingInterceptor):
    """Wraps every async-generator response stream; `stop()` ends them all with UNAVAILABLE,
    and from then on refuses every new call, unary ones included, with the same status.

    Install it innermost (next to the servicers), so the status it sets passes through the
    other interceptors like any abort. Services in `exempt` end their streams themselves
    (health Watch sends NOT_SERVING and returns) and are still answered after stop().

    `behind_at` is when a stream was last seen behind its reader: a write held by flow control
    (or one still being written when stop() comes). Since then a proxy in between may still
    hold bytes of it, the status after them (RunningServer.stop keeps the connections open).
    """

    def __init__(self, exempt: Iterable[str] = ()) -> None:
        super().__init__()
        self._stopping = asyncio.Event()
        self._exempt = tuple(f"/{service}/" for service in exempt)
        self._writing: set[object] = set()  # streams whose last message is not yet written
        self.active = 0
        self.behind_at: float | None = None  # loop time

    def stop(self) -> None:
        """Tell every running stream to end; calls that start later are refused."""
        if self._writing:
            self.behind_at = asyncio.get_running_loop().time()
        self._stopping.set()

    def wrap(self, method: str, handler: Handler) -> Handler:
        if method.startswith(self._exempt):
            return handler
        replaced = {
            name: self._tracked(fn)
            for name in ("unary_stream", "stream_stream")
            if inspect.isasyncgenfunction(fn := getattr(handler, name))
        }
        return handler._replace(**replaced) if replaced else handler  # type: ignore[attr-defined]

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await super().intercept_service(continuation, handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not self._stopping.is_set() or method.startswith(self._exempt):
            return handler
        # Streams started now end at once (their loop never runs); unary calls are refused.
        refused = {
            name: _refuse
            for name in ("unary_unary", "stream_unary")
            if getattr(handler, name) is not None
        }
        return handler._replace(**refused) if refused else handler  # type: ignore[attr-defined]

    def _tracked(
        self, fn: Callable[..., AsyncGenerator[Any, None]]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            self.active += 1
            try:
                async for message in self._until_stopped(fn(request, context)):
                    yield message
            finally:
                self.active -= 1
            if self._stopping.is_set():
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

        return call

    async def _until_stopped(self, messages: AsyncGenerator[Any, None]) -> AsyncIterator[Any]:
        """The stream's messages until it ends or stop() is called, whichever is first.

        Each step runs as a task raced against stop(), so a stream waiting on the database is
        interrupted too: cancelling the step runs the servicer's `finally` (results closed).
        All steps share one copied context, so context variables behave as in a plain loop.
        A stream waiting for its last message to be written (flow control: the reader is
        behind) is not interrupted: it ends once the write is taken, and its status follows.
        """
        steps = contextvars.copy_context()
        stopping = asyncio.ensure_future(self._stopping.wait())
        step: asyncio.Task[Any] | None = None
        me = object()
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping.is_set():
                step = asyncio.create_task(_next(messages), context=steps)
                await asyncio.wait((step, stopping), return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    return
                message = step.result()  # the servicer's exception, if any, goes up from here
                if message is _END:
                    return
                # Suspended at the yield for as long as the caller writes it.
                self._writing.add(me)
                began = loop.time()
                try:
                    yield message
                finally:
                    self._writing.discard(me)
                    if (now := loop.time()) - began > HELD_BACK:
                        self.behind_at = now
        finally:
            stopping.cancel()
            if step is not None and not step.done():
                step.cancel()
                # wait(), not `await step`: the step's CancelledError is not ours to raise.
                await asyncio.wait((step,))
            if step is not None and not step.cancelled():
                # Read, so asyncio does not log it as "Task exception was never retrieved": a
                # step that failed as the call was cancelled (measured: a refused export whose
                # deadline passed in the same loop turn) fails a call no one is waiting for.
                step.exception()
            await messages.aclose()
