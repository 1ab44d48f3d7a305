"""Streams driven by the call's own task, so a cancelled stream is closed at once, and bounded by
SHOP_STREAM_STALL_TIMEOUT on either side: a peer that takes nothing (or sends nothing) for that
long ends the call and frees what it held."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from service import errors
from service.api.context import Context
from service.api.interceptors.errors import to_status
from service.api.interceptors.peer_gone import sent
from service.api.interceptors.wrapping import Handler, WrappingInterceptor

STALLED = "STREAM_STALLED"


def _resume_token(message: Any) -> str:
    """The token an export's batch carries (every export batch has one); "" for other messages."""
    return str(getattr(message, "resume_token", ""))


def _stalled(seconds: float, message: Any) -> errors.Aborted:
    token = _resume_token(message)
    resume = {"resume_token": token} if token else {}
    return errors.Aborted(
        f"the client took no message for {seconds:g}s (SHOP_STREAM_STALL_TIMEOUT); the stream "
        + ("ends here: resume from the last batch's resume_token" if token else "ends here"),
        reason=STALLED,
        **resume,
    )


async def _end_with(context: Context, error: errors.DomainError) -> None:
    """Set the call's status to `error`'s without raising: the stream's chain is then closed as
    for any early end, and every interceptor (the access line, the metrics) reads the code from
    the context. Trailers set earlier (the x-request-id echo) are kept."""
    status = to_status(error)
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata((*(context.trailing_metadata() or ()), *status.trailing_metadata))


def _written(fn: Callable[..., Any], stall: float) -> Callable[..., Awaitable[None]]:
    async def call(request: Any, context: Context) -> None:
        async with aclosing(fn(request, context)) as messages:
            first = True
            async for message in messages:
                if first:
                    # Headers on their own, before the first message: grpc counts them sent
                    # only once a write completes, so a first write cut by the timeout would
                    # make the status try to send them again, which core refuses (TOO_MANY_
                    # OPERATIONS, a traceback, no status). Not earlier: an error before any
                    # message stays a trailers-only answer (Envoy's JSON routes map its code
                    # to the HTTP status only then).
                    await sent(context.send_initial_metadata(()))
                    first = False
                try:
                    async with asyncio.timeout(stall):
                        await sent(context.write(message))
                except TimeoutError:
                    # The write was cancelled, but grpc already holds the message: the reader
                    # gets it, then this status (so its token is the one to resume from).
                    # Leaving the `async with` closes the chain down to the export's cursor and
                    # snapshot: the connection goes back to the pool now, not when the reader
                    # wakes up.
                    await _end_with(context, _stalled(stall, message))
                    return

    return call


async def _received(requests: AsyncIterator[Any], stall: float) -> AsyncIterator[Any]:
    """The client's messages, each awaited at most `stall` seconds. Only while the handler asks:
    a handler holding back (its read-ahead is full) starts no clock."""
    iterator = aiter(requests)
    while True:
        try:
            async with asyncio.timeout(stall):
                message = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise errors.Aborted(
                f"the client sent no message for {stall:g}s (SHOP_STREAM_STALL_TIMEOUT); nothing "
                "of this call was kept: send it again",
                reason=STALLED,
            ) from None
        yield message


def _receiving(fn: Callable[..., Any], stall: float) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(fn):

        async def stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async with aclosing(fn(_received(requests, stall), context)) as messages:
                async for message in messages:
                    yield message

        return stream

    async def unary(requests: AsyncIterator[Any], context: Context) -> Any:
        return await fn(_received(requests, stall), context)

    return unary


class StreamWriter(WrappingInterceptor):
    """Turns async-generator response streams into handlers that write each message, and bounds
    how long a stream waits on its peer, either way, to `stall` seconds.

    grpc drops a generator whose client went away without closing it; the generator chain
    (interceptors, then the servicer holding a cursor and a transaction) is then only closed when
    the garbage collector finalizes it, after the call has ended. Written here instead, the
    cancellation reaches this coroutine and `aclosing` closes the chain at once, in the call's
    task, while the call is still alive. Install it outermost.

    A write blocks while the reader's flow-control window is full. A reader that takes nothing
    for `stall` seconds ends the call with ABORTED / STREAM_STALLED and its resume token, and the
    chain is closed (the export's snapshot rolled back, its connection returned). A client
    stream (ImportUsers) that sends nothing for as long while the handler waits for it fails the
    handler with the same status, so its transaction rolls back.
    """

    def __init__(self, stall: float) -> None:
        super().__init__()
        self.stall = stall

    def wrap(self, method: str, handler: Handler) -> Handler:
        replaced: dict[str, Callable[..., Any]] = {}
        for name in ("stream_unary", "stream_stream"):
            if (fn := getattr(handler, name)) is not None:
                replaced[name] = _receiving(fn, self.stall)
        for name in ("unary_stream", "stream_stream"):
            fn = replaced.get(name) or getattr(handler, name)
            if fn is not None and inspect.isasyncgenfunction(fn):
                replaced[name] = _written(fn, self.stall)
        return handler._replace(**replaced) if replaced else handler  # type: ignore[attr-defined]
