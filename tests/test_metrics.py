"""The Prometheus endpoint, scraped over HTTP from servers of the test's own."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from shop.v1 import change_feed_service_pb2 as cf
from shop.v1 import change_feed_service_pb2_grpc as cf_grpc
from shop.v1 import user_service_pb2 as api
from sqlalchemy import text

from tests.factories import Factory
from tests.servers import free_port, own_server, rpc, scrape, wait_for_sample


async def test_rpcs_move_counters_histograms_and_gauges(
    database_url: str, factory: Factory
) -> None:
    for n in range(3):
        await factory.user(email=f"m{n}@example.com")
    async with (
        own_server(database_url, metrics_port=free_port()) as server,
        own_server(database_url, metrics_port=free_port()) as idle,
    ):
        users = server.users
        await users.GetUser(api.GetUserRequest(id=1))
        await users.GetUser(api.GetUserRequest(id=2))
        with pytest.raises(Exception, match="NOT_FOUND"):
            await users.GetUser(api.GetUserRequest(id=999))
        batches = [b async for b in users.StreamUsers(api.StreamUsersRequest(batch_size=2))]
        assert len(batches) == 2

        seen = await scrape(server)
        get = "shop.v1.UserService/GetUser"
        stream = "shop.v1.UserService/StreamUsers"
        assert seen["grpc_server_handled_total", rpc(get, grpc_code="OK")] == 2
        assert seen["grpc_server_handled_total", rpc(get, grpc_code="NOT_FOUND")] == 1
        assert seen["grpc_server_handling_seconds_count", rpc(get)] == 3
        assert seen["grpc_server_handling_seconds_bucket", rpc(get, le="+Inf")] == 3
        assert seen["grpc_server_in_flight", rpc(get)] == 0
        assert seen["grpc_server_msg_sent_total", rpc(stream)] == 2
        assert seen["shop_stream_rows_sent_total", rpc(stream)] == 3
        assert seen["shop_db_pool_size", frozenset()] == 2
        assert seen["shop_db_pool_checked_out", frozenset()] == 0
        assert seen["shop_db_pool_overflow", frozenset()] == 0

        # Three GetUser calls one after another: three batches of one.
        reads = frozenset({"batcher": "user read batch"}.items())
        assert seen["shop_batch_requests_total", reads] == 3
        assert seen["shop_batches_total", reads] == 3

        # Each server has a registry of its own: the idle one saw none of this.
        assert ("grpc_server_handled_total", rpc(get, grpc_code="OK")) not in await scrape(idle)


async def test_in_flight_gauge_counts_a_paused_stream(database_url: str) -> None:
    async with own_server(database_url, metrics_port=free_port()) as server:
        call = server.users.ImportUsers()  # a client stream that sends nothing yet
        key = ("grpc_server_in_flight", rpc("shop.v1.UserService/ImportUsers"))
        assert await wait_for_sample(server, key, 1.0)
        await call.done_writing()
        assert (await call).imported == 0
        assert (await scrape(server))[key] == 0


async def test_the_change_feed_shows_its_watchers_and_lag(database_url: str) -> None:
    async with own_server(database_url, metrics_port=free_port()) as server:
        feed = cf_grpc.ChangeFeedServiceStub(server.channel)
        first = feed.WatchChanges(cf.WatchChangesRequest())
        token = (await first.read()).resume_token  # type: ignore[union-attr]
        assert await wait_for_sample(server, ("shop_changes_watchers", frozenset()), 1)
        assert await wait_for_sample(server, ("shop_changes_lag_seconds", frozenset()), 0)
        assert await wait_for_sample(server, ("shop_changes_lag_changes", frozenset()), 0)
        first.cancel()
        # 3,000 changes behind, and a reader that takes one and stops: the stream is held
        # back by flow control with most of them still to send, so it is not caught up.
        async with server.running.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO users (email, first_name, last_name) "
                    "SELECT 'lag' || n || '@example.com', 'L', 'L' FROM generate_series(1, 3000) n"
                )
            )
        # A channel of its own with a fixed receive window (no BDP probe, which may grow the
        # window until all 3,000 fit in the client's buffer, and the stream is caught up).
        address = f"127.0.0.1:{server.running.port}"
        fixed = [("grpc.http2.bdp_probe", 0)]
        async with grpc.aio.insecure_channel(address, options=fixed) as channel:
            slow_feed = cf_grpc.ChangeFeedServiceStub(channel)
            slow = slow_feed.WatchChanges(
                cf.WatchChangesRequest(resume_token=token, max_batch_size=1)
            )
            assert (await slow.read()).changes  # type: ignore[union-attr]
            for _ in range(200):
                seen = await scrape(server)
                if seen[("shop_changes_lag_seconds", frozenset())] > 0.5:
                    break
                await asyncio.sleep(0.05)
            assert seen[("shop_changes_lag_seconds", frozenset())] > 0.5
            assert seen[("shop_changes_lag_changes", frozenset())] >= 3000
            assert seen[("shop_changes_watchers", frozenset())] == 1
            slow.cancel()
        assert await wait_for_sample(server, ("shop_changes_watchers", frozenset()), 0)


async def test_batch_counters_show_concurrent_reads_sharing_batches(
    database_url: str, factory: Factory
) -> None:
    user = await factory.user(email="batched@example.com")
    calls = 64
    async with own_server(database_url, metrics_port=free_port()) as server:
        request = api.GetUserRequest(id=user.id)
        await asyncio.gather(*(server.users.GetUser(request) for _ in range(calls)))
        seen = await scrape(server)
        reads = frozenset({"batcher": "user read batch"}.items())
        assert seen["shop_batch_requests_total", reads] == calls
        # Made at once, they cannot all have run alone (one batch runs at a time).
        assert 1 <= seen["shop_batches_total", reads] < calls
