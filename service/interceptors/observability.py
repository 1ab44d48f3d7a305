"""The outermost interceptor: binds the request id (echoed in trailing metadata, on errors too),
writes one access log line per RPC and feeds the Prometheus series."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from service.handlers.context import Context
from service.interceptors.around import CallHooks, wrap_around
from service.interceptors.request_id import HEADER, bind_request_id, request_id_from
from service.interceptors.wrapping import Handler, Interceptor
from service.metrics import RpcMetrics

access_log = logging.getLogger("service.access")


def status_of(context: Context, error: BaseException | None) -> grpc.StatusCode:
    """The code the client sees: what an abort or set_code chose, else what grpc reports."""
    chosen = context.code()
    if isinstance(chosen, grpc.StatusCode):
        return chosen
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # what grpc answers for an exception nobody mapped


def rows_in(message: Any) -> int:
    """Entries of a message's repeated fields: the rows a stream batch carries."""
    if not isinstance(message, Message):
        return 0
    return sum(len(value) for field, value in message.ListFields() if field.is_repeated)


class ObservedCall(CallHooks):
    """One RPC: its id, clock, message count and, at the end, its access line and metrics."""

    def __init__(self, method: str, streaming: bool, metrics: RpcMetrics | None) -> None:
        self.method = method
        self.streaming = streaming
        self.metrics = metrics
        service, _, name = method.lstrip("/").rpartition("/")
        self.labels = (service, name)
        self.messages = 0
        self.started = time.perf_counter()
        self.request_id = "-"

    async def before(self, context: Context) -> None:
        self.request_id = request_id_from(context.invocation_metadata())
        bind_request_id(self.request_id)
        context.set_trailing_metadata(((HEADER, self.request_id),))
        if self.metrics:
            self.metrics.in_flight.labels(*self.labels).inc()

    def sent(self, message: Any) -> None:
        self.messages += 1
        if self.metrics:
            self.metrics.messages_sent.labels(*self.labels).inc()
            if self.streaming:
                self.metrics.rows_sent.labels(*self.labels).inc(rows_in(message))

    def after(self, context: Context, error: BaseException | None) -> None:
        seconds = time.perf_counter() - self.started
        code = status_of(context, error).name
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "code": code,
            "duration_ms": round(seconds * 1000, 2),
            "peer": context.peer(),
        }
        if self.streaming:
            fields["messages_sent"] = self.messages
        access_log.info(
            "%s %s %.1fms peer=%s", self.method, code, seconds * 1000, fields["peer"], extra=fields
        )
        if self.metrics:
            self.metrics.in_flight.labels(*self.labels).dec()
            self.metrics.handled.labels(*self.labels, code).inc()
            self.metrics.seconds.labels(*self.labels).observe(seconds)
        bind_request_id(None)


class ObservabilityInterceptor(Interceptor):
    """Request id, access log and metrics for every method this server knows."""

    def __init__(self, metrics: RpcMetrics | None) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED, no label to mint
            return handler
        method = handler_call_details.method
        streaming = bool(handler.response_streaming)
        return wrap_around(handler, lambda: ObservedCall(method, streaming, self.metrics))
