"""Best-effort OpenTelemetry tracing of gRPC, SQLAlchemy and the batchers, when
SHOP_OTEL_ENABLED=true and the `otel` extra is installed. Spans go to the global tracer provider;
when none is configured, an SDK provider exporting over OTLP (OTEL_EXPORTER_OTLP_* variables)
is installed, whose resource names the process (each worker exports its own spans).

Nothing here imports opentelemetry at module level, and with tracing off the server gets no
interceptor and the batchers no BatchTracing: tracing costs nothing unless it is on."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import Settings
from service.db.coalescer import BatchTracing

log = logging.getLogger(__name__)

SERVICE_NAME = "shop-service"


@dataclass
class Tracing:
    """What tracing adds to a server: its gRPC interceptors, the batchers' spans, and a flush
    for the stop. Empty when tracing is off."""

    interceptors: list[Any] = field(default_factory=list)
    batches: BatchTracing | None = None

    async def flush(self) -> None:
        """Export the spans still queued before the process exits. The SDK's force_flush blocks
        on the export (bounded by OTEL_EXPORTER_OTLP_TIMEOUT, 10 s by default, if the collector
        does not answer), so it runs in a thread."""
        if self.batches is None:
            return  # tracing is off
        from opentelemetry import trace

        force_flush = getattr(trace.get_tracer_provider(), "force_flush", None)
        if force_flush is not None:
            await asyncio.to_thread(force_flush)


class BatchSpans:
    """db/coalescer.py's BatchTracing, as OpenTelemetry advises for batch processing: a batch
    serves many calls, so it is not the child of any one of them. Its span starts a trace of
    its own (its SQL spans are its children) and carries a link to the span of each call it
    serves; each call's span is taken when the call queues."""

    def __init__(self) -> None:
        from opentelemetry import context, trace

        self._trace = trace
        self._tracer = trace.get_tracer(__name__)
        self._root = context.Context()  # no current span: the batch's span is a root

    def caller(self) -> object | None:
        span_context = self._trace.get_current_span().get_span_context()
        return span_context if span_context.is_valid else None

    def batch(self, name: str, size: int, callers: Sequence[Any]) -> AbstractContextManager[Any]:
        # (callers are the SpanContexts caller() took.) A BatchTransfer's items queue under one
        # span: one link for all of them.
        unique = {(c.trace_id, c.span_id): c for c in callers}
        return self._tracer.start_as_current_span(
            name,
            context=self._root,
            links=[self._trace.Link(c) for c in unique.values()],
            attributes={"shop.batch.size": size, "shop.batch.callers": len(unique)},
        )


def _resource() -> Any:
    """The SDK's resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES) plus what tells this
    process's spans from another worker's: process.pid and a service.instance.id of its own."""
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create(
        {"process.pid": os.getpid(), "service.instance.id": str(uuid.uuid4())}
    )
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    return resource


def _ensure_provider() -> None:
    from opentelemetry import trace

    if type(trace.get_tracer_provider()).__name__ != "ProxyTracerProvider":
        return  # the operator (or opentelemetry-instrument) configured one already
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("opentelemetry-sdk or the OTLP exporter is missing: spans are dropped")
        return
    provider = TracerProvider(resource=_resource())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def start_tracing(settings: Settings, engine: AsyncEngine) -> Tracing:
    """Instrument the engine; the gRPC server interceptor and the batchers' spans. Empty when
    off or when the extra is missing."""
    if not settings.otel_enabled:
        return Tracing()
    try:
        from opentelemetry.instrumentation import grpc as otel_grpc
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    except ImportError:
        log.warning("SHOP_OTEL_ENABLED is set but the otel extra is not installed: no tracing")
        return Tracing()
    _ensure_provider()
    # skip_dep_check: the instrumentation declares sqlalchemy < 2.1 but its engine events work
    # on 2.1; without it, it logs an error and instruments nothing.
    SQLAlchemyInstrumentor().instrument(engine=engine.sync_engine, skip_dep_check=True)
    make_interceptor: Any = otel_grpc.aio_server_interceptor  # untyped upstream
    return Tracing([make_interceptor()], BatchSpans())
