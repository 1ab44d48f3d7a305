"""Wrap every behaviour of an RpcMethodHandler (unary or streaming) with one async hook."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import grpc

from service.api.context import Context

if TYPE_CHECKING:  # generic only in the type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    Interceptor = grpc.aio.ServerInterceptor
# Called with the exception a behaviour raised and its context; must raise.
OnError = Callable[[BaseException, Context], Awaitable[None]]


class WrappingInterceptor(Interceptor):
    """An interceptor that wraps each method's handler once and reuses it.

    grpc.aio asks every interceptor for the handler on every call, and the continuation answers
    with the same handler object each time for a method; wrapping it anew per call (closures, a
    new RpcMethodHandler) is per-request waste. `wrap` runs on a method's first call (and again
    only if the inner handler changes); whatever a call needs of its own lives in the call
    (its hooks, its context, its locals), never in the wrapper. Only methods the server knows
    are cached (an unknown method has no handler), so the cache is bounded by the services.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler to serve `method` with: `handler` itself or a wrapper around it."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return handler
        method: str = handler_call_details.method
        built = self._wrapped.get(method)
        if built is not None and built[0] is handler:
            return built[1]
        wrapped = self.wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class Fused(WrappingInterceptor):
    """Several wrapping interceptors served as one, `layers` outermost first.

    grpc.aio awaits every interceptor's intercept_service on every call, each a coroutine that
    awaits the next: seven layers were seven of them per call before the handler ran. Their
    wrappers are built once per method anyway, so the fused chain builds the same nesting once
    (the first layer's wrapper outermost, as in grpc.aio's list) and a call pays one
    intercept_service. Only plain WrappingInterceptors fuse (see `fused`): one whose
    intercept_service does work of its own per call stays an interceptor of its own."""

    def __init__(self, layers: Sequence[WrappingInterceptor]) -> None:
        super().__init__()
        self.layers = tuple(layers)

    def wrap(self, method: str, handler: Handler) -> Handler:
        for layer in reversed(self.layers):
            handler = layer.wrap(method, handler)
        return handler


def fused(interceptors: Sequence[Interceptor]) -> list[Interceptor]:
    """`interceptors` in the same order, each run of plain WrappingInterceptors (not
    overriding intercept_service) fused into one."""
    out: list[Interceptor] = []
    run: list[WrappingInterceptor] = []

    def flush() -> None:
        if run:
            out.append(run[0] if len(run) == 1 else Fused(run))
            run.clear()

    for interceptor in interceptors:
        plain = type(interceptor).intercept_service is WrappingInterceptor.intercept_service
        if isinstance(interceptor, WrappingInterceptor) and plain:
            run.append(interceptor)
        else:
            flush()
            out.append(interceptor)
    flush()
    return out


Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


def with_behaviours(handler: Handler, unary: Wrap, streaming: Wrap) -> Handler:
    """The handler with each behaviour it has replaced: unary-response ones (unary_unary,
    stream_unary) by `unary(fn)`, streaming-response ones by `streaming(fn)`."""
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

    return with_behaviours(handler, unary, streaming)
