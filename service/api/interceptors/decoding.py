"""Requests are decoded inside the handler, not by grpc: bytes that are not a valid message then
answer INVALID_ARGUMENT (through the error interceptor) instead of the UNKNOWN or INTERNAL that
grpc gives when its own deserializer fails."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.message import DecodeError

from service.api.context import Context
from service.api.interceptors.element_budget import bounded
from service.api.interceptors.wrapping import Handler
from service.errors import InvalidArgument

Decode = Callable[[bytes], Any]


def _decoded(decode: Decode, raw: bytes) -> Any:
    try:
        return decode(raw)
    except DecodeError as exc:
        raise InvalidArgument.single("request", "is not a valid protobuf message") from exc


async def _decoded_stream(decode: Decode, raws: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    async for raw in raws:
        yield _decoded(decode, raw)


def decode_in_handler(handler: Handler) -> Handler:
    """The same handler, taking raw bytes and decoding them as its first step."""
    # A request over 1 MiB has its elements counted before protobuf parses it (element_budget).
    decode: Decode | None = bounded(handler.request_deserializer)
    if decode is None:
        return handler

    def unary_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(raw: bytes, context: Context) -> Any:
            return await fn(_decoded(decode, raw), context)

        return call

    def unary_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(raw: bytes, context: Context) -> AsyncIterator[Any]:
            async for message in fn(_decoded(decode, raw), context):
                yield message

        return call

    def stream_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(raws: AsyncIterator[bytes], context: Context) -> Any:
            return await fn(_decoded_stream(decode, raws), context)

        return call

    def stream_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(raws: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
            async for message in fn(_decoded_stream(decode, raws), context):
                yield message

        return call

    replaced: dict[str, Any] = {"request_deserializer": None}
    for name, wrap in (
        ("unary_unary", unary_unary),
        ("unary_stream", unary_stream),
        ("stream_unary", stream_unary),
        ("stream_stream", stream_stream),
    ):
        fn = getattr(handler, name)
        if fn is not None:
            replaced[name] = wrap(fn)
    return handler._replace(**replaced)  # type: ignore[attr-defined, no-any-return]
