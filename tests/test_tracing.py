"""OpenTelemetry, when the `otel` extra is installed: a call makes a gRPC span and SQL spans."""

from __future__ import annotations

import pytest
from shop.v1 import user_service_pb2 as api

from tests.servers import own_server

trace = pytest.importorskip("opentelemetry.trace")
pytest.importorskip("opentelemetry.instrumentation.grpc")
pytest.importorskip("opentelemetry.instrumentation.sqlalchemy")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
export = pytest.importorskip("opentelemetry.sdk.trace.export")


async def test_a_call_is_traced_with_its_sql(database_url: str) -> None:
    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process; tracing.py keeps a provider set

    async with own_server(database_url, otel_enabled=True) as server:
        made = await server.users.CreateUser(
            api.CreateUserRequest(email="t@example.com", first_name="T", last_name="R")
        )
        assert made.id > 0
    names = [span.name for span in exporter.get_finished_spans()]
    assert "/shop.v1.UserService/CreateUser" in names
    assert any(name.startswith(("INSERT", "BEGIN", "SELECT")) for name in names), names
