"""A resumed stream says when it has caught up, even when nothing changed since its token."""

from __future__ import annotations

import grpc
from shop.v1 import change_feed_service_pb2 as cf
from shop.v1 import change_feed_service_pb2_grpc as cf_grpc

from tests.changes.helpers import first_response


async def test_a_resume_with_nothing_new_answers_caught_up_first(
    channel: grpc.aio.Channel,
) -> None:
    feed = cf_grpc.ChangeFeedServiceStub(channel)
    token = (await first_response(feed, resource_types=[cf.RESOURCE_TYPE_ORDER])).resume_token
    resumed = await first_response(
        feed, resource_types=[cf.RESOURCE_TYPE_ORDER], resume_token=token
    )
    # Not a heartbeat SHOP_CHANGES_HEARTBEAT later: the stream reads once and says where it is.
    assert resumed.event == cf.CHANGE_FEED_EVENT_CAUGHT_UP
    assert not resumed.changes
    assert resumed.resume_token
