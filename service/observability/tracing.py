"""Best-effort OpenTelemetry tracing of gRPC and SQLAlchemy, when SHOP_OTEL_ENABLED=true and the
`otel` extra is installed. Spans go to the global tracer provider; when none is configured, an
SDK provider exporting over OTLP (OTEL_EXPORTER_OTLP_* variables) is installed."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import Settings

log = logging.getLogger(__name__)


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
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def tracing_interceptors(settings: Settings, engine: AsyncEngine) -> list[Any]:
    """Instrument the engine and return the gRPC server interceptor; [] when off or missing."""
    if not settings.otel_enabled:
        return []
    try:
        from opentelemetry.instrumentation import grpc as otel_grpc
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    except ImportError:
        log.warning("SHOP_OTEL_ENABLED is set but the otel extra is not installed: no tracing")
        return []
    _ensure_provider()
    # skip_dep_check: the instrumentation declares sqlalchemy < 2.1 but its engine events work
    # on 2.1; without it, it logs an error and instruments nothing.
    SQLAlchemyInstrumentor().instrument(engine=engine.sync_engine, skip_dep_check=True)
    make_interceptor: Any = otel_grpc.aio_server_interceptor  # untyped upstream
    return [make_interceptor()]
