"""ChangeFeedService: check the request, start or resume the application's feed
(service/app/changes.py), convert each batch with its resume token."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from shop.v1 import change_feed_service_pb2 as api
from shop.v1 import change_feed_service_pb2_grpc as api_grpc

from service.api.changes_convert import fill_change
from service.api.context import Context
from service.api.paging import PageTokens
from service.api.validation import Violations
from service.app.changes import ChangeFeed, FeedBatch, Position, ResourceType
from service.errors import InvalidArgument

DEFAULT_BATCH = 500
MAX_BATCH = 1000
# A change feed token carries snapshots, whose in-progress lists grow with the transactions
# in flight: longer than a page token, and still bounded.
MAX_TOKEN_LENGTH = 16_384
ALL_TYPES = tuple(ResourceType)
_STARTS = (
    api.START_POSITION_UNSPECIFIED,
    api.START_POSITION_NOW,
    api.START_POSITION_SNAPSHOT,
)


def _types(v: Violations, values: Sequence[int]) -> tuple[ResourceType, ...]:
    if len(values) > 4 * len(ALL_TYPES):
        v.add("resource_types", f"at most {4 * len(ALL_TYPES)} entries")
        return ALL_TYPES
    kinds = set()
    for i, value in enumerate(values):
        if value in ResourceType._value2member_map_:
            kinds.add(ResourceType(value))
        else:
            v.add(f"resource_types[{i}]", f"must be a resource type, not {value}")
    return tuple(sorted(kinds)) or ALL_TYPES


class ChangeFeedServicer(api_grpc.ChangeFeedServiceServicer):
    """Every committed change, exactly once along a stream and its resumes."""

    def __init__(self, feed: ChangeFeed, tokens: PageTokens) -> None:
        self.feed = feed
        self.tokens = tokens

    async def WatchChanges(
        self, request: api.WatchChangesRequest, context: Context
    ) -> AsyncIterator[api.WatchChangesResponse]:
        """A snapshot (START_POSITION_SNAPSHOT) or nothing (NOW), then each committed change;
        every response carries the token that resumes right after it."""
        v = Violations()
        kinds = _types(v, request.resource_types)
        if request.start_position not in _STARTS:
            v.add("start_position", f"unknown start position {request.start_position}")
        elif request.resume_token and request.start_position != api.START_POSITION_UNSPECIFIED:
            v.add("start_position", "must be unset when resume_token is set")
        if not 0 <= request.max_batch_size <= MAX_BATCH:
            v.add("max_batch_size", f"must be between 0 ({DEFAULT_BATCH}) and {MAX_BATCH}")
        v.raise_if_any()
        filters = {"watch": [int(k) for k in kinds]}
        start = None
        if request.resume_token:
            fields = self.tokens.unseal(
                request.resume_token, filters, "resume_token", MAX_TOKEN_LENGTH
            )
            try:
                start = Position.from_fields(fields)
            except (KeyError, ValueError, TypeError):
                raise InvalidArgument.single(
                    "resume_token", "is not a page token issued by this service"
                ) from None
        batches = self.feed.watch(
            start,
            kinds,
            request.max_batch_size or DEFAULT_BATCH,
            snapshot=request.start_position == api.START_POSITION_SNAPSHOT,
        )
        # Closed here, and with it any read of the log, even when the call ends at a yield.
        async with aclosing(batches):
            async for batch in batches:
                yield self._response(batch, filters)

    def _response(
        self, batch: FeedBatch, filters: dict[str, list[int]]
    ) -> api.WatchChangesResponse:
        response = api.WatchChangesResponse(
            resume_token=self.tokens.seal(batch.position.to_fields(), filters),
            event=int(batch.event),  # type: ignore[arg-type]
        )
        add = response.changes.add
        first = batch.position.sequence - len(batch.changes) + 1
        for i, change in enumerate(batch.changes):
            fill_change(add(), change, first + i)
        return response
