"""OpenTelemetry, when the `otel` extra is installed: a call makes a gRPC span and SQL spans."""

from __future__ import annotations

import pytest
from shop.v1 import user_service_pb2 as api

from tests import tools
from tests.servers import own_server

# The imports are in the test, so a missing extra fails it in CI (tests/tools.py) rather than
# skipping the module at import.
pytestmark = pytest.mark.requires(tools.OTEL)


async def test_a_call_is_traced_with_its_sql(database_url: str) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk import trace as sdk_trace
    from opentelemetry.sdk.trace import export
    from opentelemetry.sdk.trace.export import in_memory_span_exporter as in_memory

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
