"""Server limits through servers of the test's own: message sizes, concurrency, and, observed on
the wire through a TCP proxy, compression, keepalive, streams per connection and connection idle
and age limits. Admission's two budgets in detail: tests/test_admission.py."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc

from service.config import Compression, Settings
from service.serving.limits import limit_options
from tests.factories import Factory
from tests.faults.retry_info import retry_hint
from tests.servers import OwnServer, free_port, own_server, rpc, wait_for_sample
from tests.tcp_proxy import (
    GOAWAY,
    SETTINGS,
    GrpcMessage,
    Link,
    grpc_messages,
    http2_frames,
    settings_of,
    tcp_proxy,
)

# Bounds on each call, so a server that hung would fail the test instead of stalling the run.
CALL_TIMEOUT = 15.0
IMPORT = "shop.v1.UserService/ImportUsers"


async def test_oversized_messages_are_resource_exhausted(
    database_url: str, factory: Factory
) -> None:
    async with own_server(database_url, max_message_bytes=4096) as server:
        huge = api.CreateUserRequest(email="big@example.com", first_name="x" * 5000, last_name="Y")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.users.CreateUser(huge, timeout=CALL_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # A response past the limit fails the same way, on the server's side.
        for n in range(30):
            await factory.user(email=f"u{n}@example.com", first_name="f" * 100, last_name="l" * 100)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.users.ListUsers(api.ListUsersRequest(page_size=30), timeout=CALL_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        small = await server.users.ListUsers(api.ListUsersRequest(page_size=2))
        assert len(small.users) == 2  # under the limit all is well


async def test_past_max_concurrent_rpcs_is_resource_exhausted_not_a_hang(
    database_url: str,
) -> None:
    """Admission (service/api/interceptors/admission.py) refuses the call past the budget at once,
    with the reason TOO_MANY_CALLS and a RetryInfo, and serves again once a slot is free."""
    limited = own_server(database_url, max_concurrent_rpcs=1, metrics_port=free_port())
    async with limited as server:
        # A client stream that sends nothing keeps its RPC open as long as the client likes.
        paused = server.users.ImportUsers()
        # The in-flight gauge says when the server holds it (the metrics endpoint is not gRPC).
        assert await wait_for_sample(server, ("grpc_server_in_flight", rpc(IMPORT)), 1)
        for _ in range(3):  # refused every time, at once
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await server.users.GetUser(api.GetUserRequest(id=999), timeout=CALL_TIMEOUT)
            assert retry_hint(caught.value) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "TOO_MANY_CALLS",
                True,
            )

        await paused.done_writing()
        assert (await paused).imported == 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # room again: the call is served
            await server.users.GetUser(api.GetUserRequest(id=999), timeout=CALL_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("algorithm", "decompress"),
    [(Compression.GZIP, gzip.decompress), (Compression.DEFLATE, zlib.decompress)],
)
async def test_responses_are_compressed_on_the_wire(
    database_url: str,
    factory: Factory,
    algorithm: Compression,
    decompress: Callable[[bytes], bytes],
) -> None:
    """SHOP_COMPRESSION compresses what the server sends, for a client that asked for nothing
    (grpc clients only announce what they accept): the message crosses the wire flagged
    compressed, smaller, and is the reply once decompressed."""
    for _ in range(20):
        await factory.user(first_name="Z" * 100, last_name="Q" * 100)
    async with own_server(database_url, compression=algorithm) as server:
        reply, [message] = await through_proxy(server, api.ListUsersRequest(page_size=20))
    assert len(reply.users) == 20
    assert message.compressed
    assert api.ListUsersResponse.FromString(decompress(message.payload)) == reply
    assert len(message.payload) * 4 < reply.ByteSize()


async def test_responses_are_not_compressed_by_default(database_url: str, factory: Factory) -> None:
    await factory.user(first_name="Z" * 100, last_name="Q" * 100)
    async with own_server(database_url) as server:
        reply, [message] = await through_proxy(server, api.ListUsersRequest(page_size=1))
    assert not message.compressed
    assert api.ListUsersResponse.FromString(message.payload) == reply


async def through_proxy(
    server: OwnServer, request: api.ListUsersRequest
) -> tuple[api.ListUsersResponse, list[GrpcMessage]]:
    """ListUsers on a channel of its own through a proxy: the reply, and the messages the
    server sent on the wire."""
    async with tcp_proxy(server.running.port) as proxy:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            reply = await stub.ListUsers(request, timeout=CALL_TIMEOUT)
        [link] = proxy.links
        return reply, grpc_messages(bytes(link.from_server))


KEEPALIVE_TIME, KEEPALIVE_TIMEOUT = 1.0, 1.0  # seconds, the smallest Settings allow
# The documented bound is keepalive time + timeout; the rest is slack for a loaded 2-core box.
DROPPED_WITHIN = KEEPALIVE_TIME + KEEPALIVE_TIMEOUT + 4.0


async def test_a_silent_peer_is_dropped_by_keepalive_and_its_call_cancelled(
    database_url: str,
) -> None:
    keepalive = own_server(
        database_url,
        keepalive_time_ms=int(KEEPALIVE_TIME * 1000),
        keepalive_timeout_ms=int(KEEPALIVE_TIMEOUT * 1000),
        metrics_port=free_port(),
    )
    async with (
        keepalive as server,
        tcp_proxy(server.running.port) as proxy,
        grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as channel,
    ):
        # A client stream that sends nothing: a call in flight, and no data on the wire.
        paused = user_service_pb2_grpc.UserServiceStub(channel).ImportUsers()
        in_flight = ("grpc_server_in_flight", rpc(IMPORT))
        assert await wait_for_sample(server, in_flight, 1)
        [link] = proxy.links
        # While the peer answers its pings, the idle call outlives several keepalive rounds.
        await asyncio.sleep(2.5 * (KEEPALIVE_TIME + KEEPALIVE_TIMEOUT))
        assert not link.server_closed.is_set()

        silent_since = asyncio.get_running_loop().time()
        proxy.go_silent()
        await asyncio.wait_for(link.server_closed.wait(), CALL_TIMEOUT)
        assert link.server_closed_at is not None
        assert link.server_closed_at - silent_since <= DROPPED_WITHIN
        assert await wait_for_sample(server, in_flight, 0)  # the call was cancelled
        paused.cancel()


def test_connection_limits_become_server_options_and_zero_leaves_them_out() -> None:
    options = dict(limit_options(Settings()))
    assert options["grpc.max_concurrent_streams"] == 100
    assert options["grpc.max_connection_idle_ms"] == 300_000
    assert options["grpc.max_connection_age_ms"] == 1_800_000
    assert options["grpc.max_connection_age_grace_ms"] == 600_000
    off = Settings(max_connection_idle=0, max_connection_age=0, max_connection_age_grace=0)
    assert (
        not {
            "grpc.max_connection_idle_ms",
            "grpc.max_connection_age_ms",
            "grpc.max_connection_age_grace_ms",
        }
        & dict(limit_options(off)).keys()
    )


MAX_CONCURRENT_STREAMS = 0x3  # the HTTP/2 SETTINGS parameter


def watch(channel: grpc.aio.Channel) -> Any:
    """A health Watch stream: it answers SERVING, then stays open until cancelled."""
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())


def goaways(link: Link) -> list[bytes]:
    """The debug data of each GOAWAY the server sent on the link (after the last stream id and
    the error code): grpc names its reason there."""
    return [f.payload[8:] for f in http2_frames(bytes(link.from_server)) if f.kind == GOAWAY]


async def test_streams_per_connection_are_advertised_and_a_stream_past_them_waits(
    database_url: str,
) -> None:
    async with (
        own_server(database_url, max_streams_per_connection=2) as server,
        tcp_proxy(server.running.port) as proxy,
        grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as channel,
    ):
        calls = [watch(channel) for _ in range(3)]
        reads = [asyncio.create_task(call.read()) for call in calls]
        for _ in range(int(CALL_TIMEOUT / 0.05)):
            if sum(read.done() for read in reads) >= 2:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a moment for the third to answer, were it running
        assert sum(read.done() for read in reads) == 2
        [link] = proxy.links
        # The server's first SETTINGS frame (not an ACK) says what every connection gets.
        advertised = next(
            f for f in http2_frames(bytes(link.from_server)) if f.kind == SETTINGS and not f.flags
        )
        assert settings_of(advertised)[MAX_CONCURRENT_STREAMS] == 2

        # One stream ends: the waiting one runs, on the same connection.
        calls[next(n for n, read in enumerate(reads) if read.done())].cancel()
        [third] = [read for read in reads if not read.done()]
        reply = await asyncio.wait_for(third, CALL_TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert len(proxy.links) == 1
        for call in calls:
            call.cancel()


async def test_an_idle_connection_gets_goaway_after_max_connection_idle(
    database_url: str,
) -> None:
    """Idle means no call: a connection holding a stream longer than the limit keeps it; once
    its last call ends, GOAWAY comes, the server closes it, the channel goes IDLE, and the
    next call connects again."""
    async with (
        own_server(database_url, max_connection_idle=1) as server,
        tcp_proxy(server.running.port) as proxy,
        grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as channel,
    ):
        held = watch(channel)
        assert (await held.read()).status == health_pb2.HealthCheckResponse.SERVING
        await asyncio.sleep(3.0)  # three times the limit, with a call on it
        [link] = proxy.links
        assert goaways(link) == [] and not link.server_closed.is_set()

        held.cancel()
        await asyncio.wait_for(link.server_closed.wait(), CALL_TIMEOUT)
        assert goaways(link) == [b"connection idle"]
        state = channel.get_state()
        while state is not grpc.ChannelConnectivity.IDLE:
            await asyncio.wait_for(channel.wait_for_state_change(state), CALL_TIMEOUT)
            state = channel.get_state()
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
        assert len(proxy.links) == 2


AGE, GRACE = 1.0, 2.0  # seconds
AGE_JITTER = 0.1  # grpc core spreads the age by +-10%


async def test_an_old_connection_gets_goaway_and_its_calls_the_grace(database_url: str) -> None:
    """Past max_connection_age the server sends GOAWAY (new calls go to a new connection); a
    call still running on the old one is cut (UNAVAILABLE) only after the grace."""
    loop = asyncio.get_running_loop()
    async with (
        own_server(database_url, max_connection_age=AGE, max_connection_age_grace=GRACE) as server,
        tcp_proxy(server.running.port) as proxy,
        grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as channel,
    ):
        opened = loop.time()  # before the connection: what is measured from it is no shorter
        held = watch(channel)
        assert (await held.read()).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(held.read(), CALL_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        [link, *_] = proxy.links
        await asyncio.wait_for(link.server_closed.wait(), CALL_TIMEOUT)
        assert link.server_closed_at is not None
        assert link.server_closed_at - opened >= AGE * (1 - AGE_JITTER) + GRACE
        assert b"max_age" in goaways(link)

        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
        assert len(proxy.links) == 2
