"""The change log's retention: `prune-changes` forgets old changes, and a token that could
have missed one of them is refused FAILED_PRECONDITION / RESUME_TOKEN_EXPIRED, while newer
tokens resume as before."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
from shop.v1 import change_feed_service_pb2 as cf
from shop.v1 import change_feed_service_pb2_grpc as cf_grpc
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.housekeeping import prune_changes
from tests.changes.helpers import first_response
from tests.rpc import stream_fails

WAIT = 20.0  # bound on one expected message


async def test_a_token_older_than_the_retention_has_expired(
    channel: grpc.aio.Channel,
    user_stub: user_service_pb2_grpc.UserServiceStub,
    database_url: str,
    engine: AsyncEngine,
) -> None:
    feed = cf_grpc.ChangeFeedServiceStub(channel)
    old = (await first_response(feed, resource_types=[cf.RESOURCE_TYPE_USER])).resume_token
    await user_stub.CreateUser(
        api.CreateUserRequest(email="gone@example.com", first_name="G", last_name="G")
    )
    await asyncio.sleep(0.01)
    assert await prune_changes(database_url, timedelta(microseconds=1)) == 1
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM changes"))).scalar_one() == 0

    failure = await stream_fails(
        feed.WatchChanges(
            cf.WatchChangesRequest(resource_types=[cf.RESOURCE_TYPE_USER], resume_token=old)
        )
    )
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "RESUME_TOKEN_EXPIRED"

    # A token from after the prune resumes, and gets what came after it.
    fresh = (await first_response(feed, resource_types=[cf.RESOURCE_TYPE_USER])).resume_token
    await user_stub.CreateUser(
        api.CreateUserRequest(email="kept@example.com", first_name="K", last_name="K")
    )
    call = feed.WatchChanges(
        cf.WatchChangesRequest(resource_types=[cf.RESOURCE_TYPE_USER], resume_token=fresh)
    )
    try:
        while not (response := await asyncio.wait_for(call.read(), WAIT)).changes:
            pass
    finally:
        call.cancel()
    assert [c.user.email for c in response.changes] == ["kept@example.com"]


async def test_pruning_keeps_what_is_newer_than_the_retention(
    channel: grpc.aio.Channel,
    user_stub: user_service_pb2_grpc.UserServiceStub,
    database_url: str,
) -> None:
    feed = cf_grpc.ChangeFeedServiceStub(channel)
    token = (await first_response(feed, resource_types=[cf.RESOURCE_TYPE_USER])).resume_token
    await user_stub.CreateUser(
        api.CreateUserRequest(email="young@example.com", first_name="Y", last_name="Y")
    )
    assert await prune_changes(database_url, timedelta(days=7)) == 0
    call = feed.WatchChanges(
        cf.WatchChangesRequest(resource_types=[cf.RESOURCE_TYPE_USER], resume_token=token)
    )
    try:
        while not (response := await asyncio.wait_for(call.read(), WAIT)).changes:
            pass
    finally:
        call.cancel()
    assert [c.user.email for c in response.changes] == ["young@example.com"]
