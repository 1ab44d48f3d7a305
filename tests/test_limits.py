"""Server limits through servers of the test's own: message sizes, concurrency, compression."""

from __future__ import annotations

import grpc
import pytest
from shop.v1 import user_service_pb2 as api

from service.config import Compression, Settings
from service.limits import compression
from service.server import server_options
from tests.factories import Factory
from tests.servers import free_port, own_server, rpc, wait_for_sample

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


@pytest.mark.parametrize("algorithm", [Compression.GZIP, Compression.DEFLATE])
async def test_compressed_server_answers(database_url: str, algorithm: Compression) -> None:
    assert compression(Settings(compression=algorithm)).name.lower() == algorithm.value
    async with own_server(database_url, compression=algorithm) as server:
        made = await server.users.CreateUser(
            api.CreateUserRequest(email="z@example.com", first_name="Z" * 100, last_name="Q"),
            timeout=CALL_TIMEOUT,
        )
        again = await server.users.GetUser(api.GetUserRequest(id=made.id), timeout=CALL_TIMEOUT)
        assert again.first_name == "Z" * 100


def test_keepalive_and_size_settings_reach_the_channel_arguments() -> None:
    options = dict(
        server_options(
            Settings(keepalive_time_ms=30_000, keepalive_timeout_ms=5_000, max_message_bytes=2048)
        )
    )
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.max_receive_message_length"] == 2048
    assert options["grpc.max_send_message_length"] == 2048
