"""ImportUsers' pipeline: the stream is read (and checked) ahead while the records before it
are copied into the staging table."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from itertools import chain

# A row of the staging table: email (lowercased), first_name, last_name (stripped), is_active.
StagedUser = tuple[str, str, str, bool]

# Rows read and checked ahead of the COPY in flight (give or take a message): what queued up
# meanwhile goes in the next COPY (fewer, larger statements when the client is faster than the
# database), and a client faster still meets grpc's flow control, not an unbounded queue.
READ_AHEAD_ROWS = 16_384


@dataclass(frozen=True, slots=True)
class _End:
    """The reader's last word: the stream ended (error None) or failed."""

    error: BaseException | None


async def stage_all(
    batches: AsyncIterator[list[StagedUser]],
    stage: Callable[[list[StagedUser]], Awaitable[None]],
    *,
    read_ahead_rows: int = READ_AHEAD_ROWS,
) -> None:
    """Stage every batch, in order. A reader task receives and checks the next batches while
    `stage` copies the earlier ones, and whatever it queued meanwhile is staged in one call.
    An error of the stream or of a batch is raised here once the COPY in flight is done; when
    this ends early (an error, the call cancelled), the reader is cancelled and awaited.
    When the client pauses, nothing is held back: what arrived is staged."""
    queue: asyncio.Queue[list[StagedUser] | _End] = asyncio.Queue()
    room = asyncio.Event()
    room.set()
    queued = 0

    async def read() -> None:
        nonlocal queued
        try:
            async for records in batches:
                if not records:
                    continue
                queue.put_nowait(records)
                queued += len(records)
                if queued >= read_ahead_rows:
                    room.clear()
                    await room.wait()
        except BaseException as exc:  # the consumer raises it, whatever it is
            queue.put_nowait(_End(exc))
            if not isinstance(exc, Exception):
                raise
        else:
            queue.put_nowait(_End(None))

    reader = asyncio.create_task(read())
    try:
        while True:
            got = [await queue.get()]
            while not queue.empty():
                got.append(queue.get_nowait())
            queued = 0
            room.set()
            end = got[-1] if isinstance(got[-1], _End) else None
            if end is not None and end.error is not None:
                raise end.error
            ready = [records for records in got if not isinstance(records, _End)]
            if ready:
                await stage(ready[0] if len(ready) == 1 else list(chain.from_iterable(ready)))
            if end is not None:
                return
    finally:
        if not reader.done():
            reader.cancel()
            await asyncio.wait([reader])
