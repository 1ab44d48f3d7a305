"""ImportUsers' pipeline: the stream is read (and checked) ahead while the records before it
are copied, straight into users while no email of the import is taken, else into the staging
table that one merge empties at the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from itertools import chain

from service.repositories.users import UserRepository

# A row of the staging table: email (lowercased), first_name, last_name (stripped), is_active.
StagedUser = tuple[str, str, str, bool]

# Rows read and checked ahead of the COPY in flight (give or take a message): what queued up
# meanwhile goes in the next COPY (fewer, larger statements when the client is faster than the
# database), and a client faster still meets grpc's flow control, not an unbounded queue.
READ_AHEAD_ROWS = 16_384


# Batches copied straight into users, at most: each is a savepoint whose xid stays in the
# transaction's subtransaction cache until the commit, and past 64 (PGPROC_MAX_CACHED_SUBXIDS)
# the cache overflows and every other session's snapshot must look subtransactions up in
# pg_subtrans while the import runs. The merge and the ANALYZE take two more. With a client
# faster than the database a batch is about READ_AHEAD_ROWS rows (some 1M rows straight in);
# the batches after the last are staged and merged, as when an email is taken.
MAX_STRAIGHT_COPIES = 60


class Loader:
    """Where each batch of an import goes: straight into users (COPY, in a savepoint), as a
    raw COPY would, while no email has been taken; from the first batch with a taken email on
    (a user's, or one copied before: the import repeats it), that batch and the rest into the
    staging table, for merge() at the end.

    Splitting each later batch by a lookup of its emails (new rows straight in, taken ones
    staged) was tried: the lookup costs an index probe per row, about 0.4x of the row's COPY,
    which is what ON CONFLICT's own insertion of a new row costs beyond a COPY; on two busy
    cores a half-existing import ran 0.44x of the raw COPY with it, 0.49x without."""

    def __init__(self, users: UserRepository) -> None:
        self.users = users
        self.copied = 0
        self.staged = 0
        self.conflicted = False
        # The first email of each batch copied straight in: it finds the batch's xid later.
        self._firsts: list[str] = []

    async def load(self, records: list[StagedUser]) -> None:
        if not self.staged and len(self._firsts) < MAX_STRAIGHT_COPIES:
            if await self.users.copy_into_users(records):
                self._firsts.append(records[0][0])
                self.copied += len(records)
                return
            self.conflicted = True
        await self.users.copy_into_staging(records, first=not self.staged)
        self.staged += len(records)

    async def merge(self) -> int | list[str]:
        """Merge the staged rows (none: nothing to do); the rows imported in all, or the
        emails (up to 10) that are in the import more than once, with nothing merged."""
        if not self.staged:
            return self.copied
        copied = await self.users.copied_xids(self._firsts)
        # A plain INSERT is worth trying only when no batch met a taken email (the straight
        # copies stopped at their bound): otherwise it would fail part way, for nothing.
        merged = None if self.conflicted else await self.users.insert_staged()
        if merged is None:
            merged = await self.users.merge_staging(self.staged, copied)
        if merged is None:
            return await self.users.staged_duplicates(copied)
        return self.copied + merged


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
