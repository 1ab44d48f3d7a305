"""Traces that reach a collector (issue 22, goal 5): `serve` with SHOP_WORKERS=2 and
SHOP_OTEL_ENABLED=true exports its spans over OTLP/gRPC to a receiver this test runs (the
collector's TraceService), each worker its own, flushed when SIGTERM stops it. A GetUser, a
batch of Transfers and a StreamUsers reach each worker; their SQL spans hang under the call's
span, or under the batch's span that links to the call."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.v1 import account_service_pb2 as acc
from shop.v1 import account_service_pb2_grpc, user_service_pb2_grpc
from shop.v1 import user_service_pb2 as api

from tests import tools
from tests.factories import Factory
from tests.ids import rid
from tests.process import START_TIMEOUT, STOP_TIMEOUT, service_process

pytestmark = pytest.mark.requires(tools.OTEL)

# Concurrent Transfers on one connection: they reach one worker's money writer together, and
# all but the first (which starts a batch at once) queue for the next batch.
TRANSFERS = 8
# Channels opened, at most, until each worker has one: the kernel spreads new connections over
# the two listening sockets by a hash of their ports, so 40 all landing on one is 2^-39.
MAX_CHANNELS = 40
# A channel's own subchannel pool: a new TCP connection (grpc would reuse the last one).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
GET_USER = "/shop.v1.UserService/GetUser"
TRANSFER = "/shop.v1.AccountService/Transfer"
STREAM_USERS = "/shop.v1.UserService/StreamUsers"


@dataclass(frozen=True)
class Span:
    """One span as the collector received it, with the pid of the process that made it."""

    name: str
    trace_id: int
    span_id: int
    parent_id: int | None
    links: frozenset[tuple[int, int]]
    attributes: dict[str, Any]
    pid: int
    instance: str

    @property
    def statement(self) -> str:
        return str(self.attributes.get("db.statement") or self.attributes.get("db.query.text"))


def _value(any_value: Any) -> Any:
    return getattr(any_value, any_value.WhichOneof("value"))


class Collector:
    """The OTLP/gRPC TraceService of a collector, keeping every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def Export(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(_span(s, resource) for s in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def _span(span: Any, resource: dict[str, Any]) -> Span:
    def number(raw: bytes) -> int:
        return int.from_bytes(raw, "big")

    return Span(
        name=span.name,
        trace_id=number(span.trace_id),
        span_id=number(span.span_id),
        parent_id=number(span.parent_span_id) if span.parent_span_id else None,
        links=frozenset((number(link.trace_id), number(link.span_id)) for link in span.links),
        attributes={a.key: _value(a.value) for a in span.attributes},
        pid=int(resource["process.pid"]),
        instance=str(resource["service.instance.id"]),
    )


@asynccontextmanager
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    """A receiver on a free port of 127.0.0.1, served from this test's event loop."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    received = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(received, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield received, port
    finally:
        await server.stop(None)


@dataclass(frozen=True)
class Caller:
    """A client span of this test's own, sent as W3C traceparent: the server's span for the
    call joins its trace, which is how the test finds it."""

    trace_id: int
    span_id: int

    @classmethod
    def new(cls) -> Caller:
        return cls(random.getrandbits(128) or 1, random.getrandbits(64) or 1)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("traceparent", f"00-{self.trace_id:032x}-{self.span_id:016x}-01"),)


def wait_until_all_serve(log: Path, workers: int) -> None:
    """Health answered for one worker; the others may still be starting, and a connection
    reaches only the sockets already listening. Each worker logs this line once it serves."""
    deadline = time.monotonic() + START_TIMEOUT
    while log.read_text().count("serving shop.v1 on") < workers:
        if time.monotonic() > deadline:
            pytest.fail(
                f"not {workers} workers serving after {START_TIMEOUT:.0f}s:\n{log.read_text()}"
            )
        time.sleep(0.1)


def inbound(pid: int, port: int) -> set[int]:
    """The client ports of the connections worker `pid` accepted on `port`."""
    return {
        c.raddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port and c.raddr
    }


async def channel_per_worker(
    address: str, workers: set[int], channels: list[grpc.aio.Channel]
) -> dict[int, grpc.aio.Channel]:
    """Open channels (each its own TCP connection: a local subchannel pool) until each worker
    has accepted one; which worker took a channel is the one whose accepted connections grew."""
    port = int(address.rsplit(":", 1)[1])
    taken: dict[int, grpc.aio.Channel] = {}
    for _ in range(MAX_CHANNELS):
        before = {pid: inbound(pid, port) for pid in workers}
        channel = grpc.aio.insecure_channel(address, options=OWN_CONNECTION)
        channels.append(channel)
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        grew = [pid for pid in workers if inbound(pid, port) - before[pid]]
        assert len(grew) == 1, (grew, before)
        taken.setdefault(grew[0], channel)
        if len(taken) == len(workers):
            return taken
    pytest.fail(f"{MAX_CHANNELS} connections, all taken by workers {sorted(taken)}")


@dataclass
class Calls:
    """The callers' spans of one worker's calls."""

    get_user: Caller
    transfers: list[Caller]
    stream_users: Caller


async def drive(channel: grpc.aio.Channel, user_id: int, source: int, target: int) -> Calls:
    """A GetUser, TRANSFERS concurrent Transfers, then a StreamUsers, each from a span of its
    own."""
    users = user_service_pb2_grpc.UserServiceStub(channel)
    accounts = account_service_pb2_grpc.AccountServiceStub(channel)
    calls = Calls(Caller.new(), [Caller.new() for _ in range(TRANSFERS)], Caller.new())
    got = await users.GetUser(
        api.GetUserRequest(id=user_id), metadata=calls.get_user.metadata, timeout=10
    )
    assert got.id == user_id
    await asyncio.gather(
        *(
            accounts.Transfer(
                acc.TransferRequest(
                    from_account_id=source, to_account_id=target, amount="1.00", request_id=rid()
                ),
                metadata=caller.metadata,
                timeout=10,
            )
            for caller in calls.transfers
        )
    )
    stream = users.StreamUsers(
        api.StreamUsersRequest(batch_size=10), metadata=calls.stream_users.metadata, timeout=10
    )
    assert [user.id async for batch in stream for user in batch.users] == [user_id]
    return calls


class Spans:
    """What the collector received, to follow parents and links."""

    def __init__(self, spans: list[Span]) -> None:
        self.all = spans
        self.by_id = {(s.trace_id, s.span_id): s for s in spans}

    def rpc(self, caller: Caller, method: str) -> Span:
        """The server's span of the call `caller` made: in its trace, its child."""
        found = [s for s in self.all if s.trace_id == caller.trace_id and s.name == method]
        assert len(found) == 1, (method, found)
        assert found[0].parent_id == caller.span_id
        return found[0]

    def ancestors(self, span: Span) -> Iterator[Span]:
        while span.parent_id is not None:
            parent = self.by_id.get((span.trace_id, span.parent_id))
            if parent is None:
                return
            yield parent
            span = parent

    def sql_under(self, top: Span) -> list[Span]:
        """The SQL spans whose parent is `top` or a span under it, in its trace."""
        return [
            s
            for s in self.all
            if s.attributes.get("db.system") == "postgresql" and top in self.ancestors(s)
        ]

    def batches_linking(self, name: str, call: Span) -> list[Span]:
        return [s for s in self.all if s.name == name and (call.trace_id, call.span_id) in s.links]


def assert_traced(spans: Spans, pid: int, calls: Calls) -> None:
    # GetUser: its SELECT runs in the point-read batch, whose span links to the call.
    get_user = spans.rpc(calls.get_user, GET_USER)
    assert get_user.pid == pid
    [reads] = spans.batches_linking("user read batch", get_user)
    assert reads.pid == pid and reads.parent_id is None
    assert any("FROM users" in s.statement for s in spans.sql_under(reads)), reads

    # Transfer: each call is linked from the money batch that applied it, and the batch's SQL
    # (the balances and the journal) is under the batch's span.
    batches: dict[tuple[int, int], Span] = {}
    for caller in calls.transfers:
        transfer = spans.rpc(caller, TRANSFER)
        assert transfer.pid == pid
        [batch] = spans.batches_linking("money batch", transfer)
        batches[batch.trace_id, batch.span_id] = batch
    assert all(batch.pid == pid for batch in batches.values())
    assert max(len(batch.links) for batch in batches.values()) > 1, "no batch served two calls"
    for batch in batches.values():
        statements = [s.statement for s in spans.sql_under(batch)]
        assert any("UPDATE accounts" in s for s in statements), statements
        assert any("INSERT INTO transfers" in s for s in statements), statements

    # StreamUsers: its snapshot's SQL runs in the call's own task, under the call's span.
    stream = spans.rpc(calls.stream_users, STREAM_USERS)
    assert stream.pid == pid
    assert any("FROM users" in s.statement for s in spans.sql_under(stream)), stream


async def test_two_workers_export_their_spans_to_a_collector(
    database_url: str, factory: Factory, tmp_path: Path
) -> None:
    user = await factory.user()
    source = await factory.account(user, balance="100.00")
    target = await factory.account(user)
    log = tmp_path / "serve.log"
    async with collector() as (received, otlp_port):
        otel = {
            "SHOP_WORKERS": "2",
            "SHOP_OTEL_ENABLED": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            # Longer than the test: nothing is exported on the timer, so every span the
            # collector gets was flushed by the stop.
            "OTEL_BSP_SCHEDULE_DELAY": "600000",
        }
        with service_process(database_url, log, **otel) as (address, process):
            workers = {
                child.pid
                for child in psutil.Process(process.pid).children()
                if "spawn_main" in " ".join(child.cmdline())
            }
            assert len(workers) == 2
            wait_until_all_serve(log, len(workers))
            channels: list[grpc.aio.Channel] = []
            try:
                per_worker = await channel_per_worker(address, workers, channels)
                calls = {
                    pid: await drive(channel, user.id, source.id, target.id)
                    for pid, channel in per_worker.items()
                }
            finally:
                for channel in channels:
                    await channel.close()
            assert received.spans == [], "exported before the stop"

            process.send_signal(signal.SIGTERM)
            # In a thread: the workers' flush waits on the collector, served from this loop.
            code = await asyncio.to_thread(process.wait, STOP_TIMEOUT)
            assert code == 0, log.read_text()

    spans = Spans(received.spans)
    assert {s.pid for s in spans.all} == workers
    # Each worker is an instance of its own; the service is named by default.
    assert len({(s.pid, s.instance) for s in spans.all}) == 2
    for pid in workers:
        assert_traced(spans, pid, calls[pid])
