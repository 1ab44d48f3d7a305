"""OpenTelemetry, when the `otel` extra is installed: a call makes a gRPC span and SQL spans,
under the call's span or, for a batched call, under its batch's span, which links to the call."""

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
        await server.users.GetUser(api.GetUserRequest(id=made.id))
    spans = exporter.get_finished_spans()
    by_name = {span.name: span for span in spans}

    # CreateUser's SQL runs in the call's own task: its spans are the call's children.
    create = by_name["/shop.v1.UserService/CreateUser"]
    insert = by_name["INSERT"]
    assert insert.parent is not None and insert.parent.span_id == create.context.span_id

    # GetUser's runs in the point-read batch: a span of its own, linking to the call.
    get = by_name["/shop.v1.UserService/GetUser"]
    batch = by_name["user read batch"]
    assert [link.context.span_id for link in batch.links] == [get.context.span_id]
    assert batch.parent is None
    select = [s for s in spans if s.parent and s.parent.span_id == batch.context.span_id]
    assert any(s.name == "SELECT" for s in select), [s.name for s in spans]
