"""The outermost interceptor: binds the request id (echoed in trailing metadata, on errors too),
writes one access log line per RPC and feeds the Prometheus series."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from google.protobuf.message import Message

from service.api.context import Context
from service.api.interceptors.around import CallHooks, wrap_around
from service.api.interceptors.wrapping import Handler, WrappingInterceptor
from service.observability.metrics import RpcMetrics
from service.observability.request_id import HEADER, bind_request_id, request_id_from

access_log = logging.getLogger("service.access")
# A client whose deadline passes resets the call itself, and that reset can reach the server
# just before the server's own timer fires: measured 0 to 5 ms of the deadline still left
# (tests/test_quiet_logs.py, loopback). A cancel that close to the deadline counts as it.
DEADLINE_SLACK = 0.1


def status_of(context: Context, error: BaseException | None) -> grpc.StatusCode:
    """The code the client sees: what an abort or set_code chose, else what grpc reports."""
    chosen = context.code()
    if isinstance(chosen, grpc.StatusCode):
        return chosen
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        # grpc cancels the call's task alike for a client's cancel and for its deadline.
        remaining = context.time_remaining()
        if remaining is not None and remaining <= DEADLINE_SLACK:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # what grpc answers for an exception nobody mapped


def rows_in(message: Any) -> int:
    """Entries of a message's repeated fields: the rows a stream batch carries. A batch sent
    already serialized (handlers/users_encode.EncodedBatch) says how many it holds."""
    if not isinstance(message, Message):
        return int(getattr(message, "rows", 0))
    return sum(len(value) for field, value in message.ListFields() if field.is_repeated)


def labels_of(method: str) -> tuple[str, str]:
    """The (grpc_service, grpc_method) labels of "/package.Service/Method"."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class ObservedCall(CallHooks):
    """One RPC: its id, clock, message count and, at the end, its access line and metrics."""

    def __init__(
        self,
        method: str,
        streaming: bool,
        metrics: RpcMetrics | None,
        labels: tuple[str, str] | None = None,
    ) -> None:
        self.method = method
        self.streaming = streaming
        self.metrics = metrics
        self.labels = labels or labels_of(method)
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
        # Checked first, as logging would, so a server logging at WARNING builds no fields.
        if access_log.isEnabledFor(logging.INFO):
            self._log(context, code, seconds)
        if self.metrics:
            self.metrics.in_flight.labels(*self.labels).dec()
            self.metrics.handled.labels(*self.labels, code).inc()
            self.metrics.seconds.labels(*self.labels).observe(seconds)
        bind_request_id(None)

    def _log(self, context: Context, code: str, seconds: float) -> None:
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


class ObservabilityInterceptor(WrappingInterceptor):
    """Request id, access log and metrics for every method this server knows (an unknown
    method gets no handler, hence no label minted for it: grpc answers UNIMPLEMENTED)."""

    def __init__(self, metrics: RpcMetrics | None) -> None:
        super().__init__()
        self.metrics = metrics

    def wrap(self, method: str, handler: Handler) -> Handler:
        streaming = bool(handler.response_streaming)
        labels = labels_of(method)
        metrics = self.metrics
        return wrap_around(handler, lambda: ObservedCall(method, streaming, metrics, labels))
