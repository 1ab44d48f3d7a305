"""Server limits through servers of the test's own: message sizes, concurrency, and, observed on
the wire through a TCP proxy, compression and keepalive."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Callable

import grpc
import pytest
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc

from service.config import Compression
from tests.factories import Factory
from tests.servers import OwnServer, free_port, own_server, rpc, wait_for_sample
from tests.tcp_proxy import GrpcMessage, grpc_messages, tcp_proxy

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
    limited = own_server(database_url, max_concurrent_rpcs=1, metrics_port=free_port())
    async with limited as server:
        # A client stream that sends nothing keeps its RPC open as long as the client likes.
        paused = server.users.ImportUsers()
        # The in-flight gauge says when the server holds it (the metrics endpoint is not gRPC).
        assert await wait_for_sample(server, ("grpc_server_in_flight", rpc(IMPORT)), 1)
        for _ in range(3):  # refused every time, at once
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await server.users.GetUser(api.GetUserRequest(id=999), timeout=CALL_TIMEOUT)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

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
