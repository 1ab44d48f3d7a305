"""What the change-feed tests share: a WatchChanges call read in the background."""

from __future__ import annotations

import asyncio
from typing import Any

from shop.v1 import change_feed_service_pb2 as cf
from shop.v1 import change_feed_service_pb2_grpc as cf_grpc

WAIT = 20.0  # bound on any one expected message; the feed polls every 0.05 s


class Watcher:
    """One WatchChanges call read in the background: every response, in order."""

    def __init__(self, stub: cf_grpc.ChangeFeedServiceStub, request: cf.WatchChangesRequest):
        self.call = stub.WatchChanges(request)
        self.responses: list[cf.WatchChangesResponse] = []
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for response in self.call:
            self.responses.append(response)
            self._arrived.set()

    @property
    def changes(self) -> list[cf.Change]:
        return [c for r in self.responses for c in r.changes]

    async def until(self, check: Any, what: str, wait: float = WAIT) -> None:
        async def wait_for_it() -> None:
            while not check(self):
                if self._task.done():
                    self._task.result()
                    raise AssertionError(f"the stream ended before {what}")
                self._arrived.clear()
                await self._arrived.wait()

        try:
            await asyncio.wait_for(wait_for_it(), wait)
        except TimeoutError:
            raise AssertionError(f"no {what} within {wait} s: {self.summary()[-50:]}") from None

    async def changes_at_least(self, n: int) -> list[cf.Change]:
        await self.until(lambda w: len(w.changes) >= n, f"{n} changes")
        return self.changes

    def summary(self) -> list[tuple[int, int, int, int]]:
        return [(c.resource_type, change_id(c), c.version, c.operation) for c in self.changes]

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def change_id(change: cf.Change) -> int:
    """The id of the resource a change carries."""
    return int(getattr(change, change.WhichOneof("resource")).id)


async def first_response(
    stub: cf_grpc.ChangeFeedServiceStub, **fields: Any
) -> cf.WatchChangesResponse:
    """The first response of a WatchChanges call, which is then cancelled."""
    call = stub.WatchChanges(cf.WatchChangesRequest(**fields))
    try:
        response: cf.WatchChangesResponse = await asyncio.wait_for(call.read(), WAIT)
        return response
    finally:
        call.cancel()
