"""The change feed: every committed change of users, orders, accounts and transfers, in commit
order per resource, exactly once along a stream and its resumes (docs/change-feed.md).

What is read: alembic 0007's triggers write, in the writing transaction, one `changes` row per
statement holding [operation, row as after it] for every row it touched, tagged with the
transaction's id (xid). What is commit-safe: a transaction's changes are handed out once it
is visible in a snapshot (pg_current_snapshot) that the position did not cover. A position is
a snapshot: everything visible in it has been delivered. The next read takes the changes of
the transactions visible in a newer snapshot and not in the position's (the two snapshots'
difference), ordered by changes.id, and the newer snapshot becomes the position.

Why that is commit order per resource: two transactions that change one resource are ordered
by its row lock, so the later one writes its changes row after the earlier one committed
(a larger changes.id); if both fall in one difference, changes.id orders them; if not, the one
in the earlier difference committed before the later difference's snapshot was taken, so it
is the earlier one. A transaction still in flight is in the newer snapshot's in-progress list:
it is read by the difference after the one in which it commits, never skipped.

Positions are snapshots, so they mean the same on the primary, on a replica (xids are the
cluster's) and after a failover; a read whose own snapshot does not yet cover the position
(a replica behind it) waits rather than hand out less.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import IntEnum
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from service.db.database import Database
from service.db.deadlines import deadline_bound
from service.db.routing import PRIMARY, reading_from
from service.errors import FailedPrecondition
from service.repositories.changes import ChangeLog

log = logging.getLogger(__name__)

# Changes rows fetched per round trip when a stream reads the log itself (each holds up to
# 1000 changes: one per statement, per 1000 rows of a large one).
LOG_ROWS_PER_FETCH = 64
# A poll hands out at most this many changes rows, holding at most POLL_CHANGES changes; past
# either, the streams read the log themselves (a burst the size of an import is not held in the
# poller's memory), and the polls kept hold at most KEPT_CHANGES changes in all (a user's change
# is about 1 KB as Python objects: ~20 MB). Measured: 200,000 users logged in bulk while a
# watcher read nothing took the server from 94 to 233 MB before these bounds
# (tests/changes/test_watchers.py, the slow reader).
POLL_CAP = 200
POLL_CHANGES = 5_000
KEPT_CHANGES = 20_000
# No transaction id reaches this: a poll from it reads no change, only the snapshot.
NOTHING = 2**63 - 1
# Polls kept for streams a step behind.
STEPS_KEPT = 32
# A commit through this process wakes the poll before its interval is up, but polls start at
# least this far apart: under a steady write load, polls at most 100/s rather than one per
# commit, and a commit made through another process still waits for the interval.
NUDGED_GAP = 0.01


class ResourceType(IntEnum):
    """shop.v1.ResourceType's numbers, as alembic 0007 writes them in changes.resource_type."""

    USER = 1
    ORDER = 2
    ACCOUNT = 3
    TRANSFER = 4


class Operation(IntEnum):
    """shop.v1.Operation's numbers, as alembic 0007 writes them in each [operation, row]."""

    CREATED = 1
    UPDATED = 2
    DELETED = 3
    SNAPSHOT = 4


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A pg_snapshot: transactions below xmin are finished, those from xmax on had not begun,
    and those in xip were in progress; every other one below xmax had finished. `taken`: the
    primary's clock just after it was taken (None where not known), which tells a transaction
    it counts as finished from one that reused its xid after a failover (a change written
    later than `taken`; service/repositories/changes.py). Not part of equality: two reads of
    the same snapshot are the same position."""

    xmin: int
    xmax: int
    xip: frozenset[int]
    taken: datetime | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: str, taken: datetime | None = None) -> Snapshot:
        """From pg_snapshot's text form, 'xmin:xmax:xip1,xip2'; ValueError if malformed."""
        xmin_text, xmax_text, xip_text = text.split(":")
        xmin, xmax = int(xmin_text), int(xmax_text)
        xip = frozenset(int(x) for x in xip_text.split(",")) if xip_text else frozenset()
        if not 0 < xmin <= xmax or any(not xmin <= x < xmax for x in xip):
            raise ValueError(f"not a snapshot: {text!r}")
        return cls(xmin, xmax, xip, taken)

    def __str__(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(str(x) for x in sorted(self.xip))}"

    def sees(self, xid: int) -> bool:
        """Whether a transaction finished before this snapshot (pg_visible_in_snapshot)."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.xip)

    def covers(self, other: Snapshot) -> bool:
        """Whether every transaction `other` sees, this one sees too."""
        if self.xmax < other.xmax:
            return False
        return all(x >= other.xmax or x in other.xip for x in self.xip)


@dataclass(slots=True)  # not frozen: a frozen init costs 0.5 µs more, once per change
class FeedChange:
    """One change as the feed hands it out: `row` is the resource as after the change, as
    PostgreSQL's to_jsonb wrote it (numbers as Decimal, timestamps as ISO 8601 strings); an
    order's row carries its lines under "items" (a list of to_jsonb(order_items) rows)."""

    resource_type: ResourceType
    operation: Operation
    version: int
    time: datetime
    row: dict[str, Any]


class Event(IntEnum):
    """shop.v1.ChangeFeedEvent's numbers."""

    NONE = 0
    SNAPSHOT_DONE = 1
    CAUGHT_UP = 2
    HEARTBEAT = 3


@dataclass(frozen=True, slots=True)
class Segment:
    """Resources from (resource_type, after_id) on, in scan order, were exported at snapshot
    `at` (a snapshot resumed in a newer transaction): a change of theirs that `at` sees is in
    the snapshot already and is not handed out again."""

    at: Snapshot
    resource_type: ResourceType
    after_id: int


@dataclass(frozen=True, slots=True)
class Position:
    """Where a stream is; a resume token carries it. Every change `since` sees was handed out
    (or is in the snapshot); `sequence` is the last sequence handed out. Mid-snapshot, `scan`
    is the last row sent, as (type, id). Mid-difference, `upto` is the snapshot the difference
    is read to and `offset` how many of its changes were sent."""

    since: Snapshot
    sequence: int = 0
    scan: tuple[ResourceType, int] | None = None
    segments: tuple[Segment, ...] = ()
    upto: Snapshot | None = None
    offset: int = 0

    def to_fields(self) -> dict[str, str | int]:
        """Flat fields for a token (service/api signs them)."""
        return {
            "since": str(self.since),
            "t": _micros(self.since.taken),
            "seq": self.sequence,
            "scan": "" if self.scan is None else f"{int(self.scan[0])}:{self.scan[1]}",
            "seg": ";".join(f"{s.at}|{int(s.resource_type)}|{s.after_id}" for s in self.segments),
            "upto": "" if self.upto is None else str(self.upto),
            "ut": 0 if self.upto is None else _micros(self.upto.taken),
            "off": self.offset,
        }

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Position:
        """The inverse of to_fields; ValueError (or KeyError, TypeError) if they do not parse."""
        scan_text, seg_text, upto_text = str(fields["scan"]), str(fields["seg"]), fields["upto"]
        scan = None
        if scan_text:
            kind, last_id = scan_text.split(":")
            scan = (ResourceType(int(kind)), int(last_id))
        segments = []
        for part in seg_text.split(";") if seg_text else ():
            at, kind, after = part.split("|")
            segments.append(Segment(Snapshot.parse(at), ResourceType(int(kind)), int(after)))
        sequence, offset = fields["seq"], fields["off"]
        if not isinstance(sequence, int) or not isinstance(offset, int) or sequence < 0:
            raise ValueError("not a position")
        if offset < 0 or (offset and not upto_text):
            raise ValueError("not a position")
        since_taken, upto_taken = _time(fields.get("t", 0)), _time(fields.get("ut", 0))
        return cls(
            since=Snapshot.parse(str(fields["since"]), since_taken),
            sequence=sequence,
            scan=scan,
            segments=tuple(segments),
            upto=Snapshot.parse(str(upto_text), upto_taken) if upto_text else None,
            offset=offset,
        )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(taken: datetime | None) -> int:
    """A snapshot's time in a token: microseconds since the epoch, 0 for none."""
    return 0 if taken is None else (taken - _EPOCH) // timedelta(microseconds=1)


def _time(micros: Any) -> datetime | None:
    if not isinstance(micros, int) or micros < 0:
        raise ValueError("not a position")
    return _EPOCH + timedelta(microseconds=micros) if micros else None


@dataclass(frozen=True, slots=True)
class FeedBatch:
    """What one response carries: changes, the position right after them, and an event."""

    changes: list[FeedChange]
    position: Position
    event: Event = Event.NONE


def _ahead(head: Snapshot, since: Snapshot) -> bool:
    """Whether `head` sees a transaction that `since` does not."""
    return head.xmax > since.xmax or any(head.sees(x) for x in since.xip)


def _exported(segments: Sequence[Segment], kind: ResourceType, resource_id: int, xid: int) -> bool:
    """Whether a change is already in a resumed snapshot's rows (see Segment)."""
    covering = None
    for segment in segments:
        if (segment.resource_type, segment.after_id) < (kind, resource_id):
            covering = segment
    return covering is not None and covering.at.sees(xid)


def _expired(since: Snapshot, pruned: int) -> bool:
    """Whether the log was pruned of a transaction that `since` does not see (every pruned one
    has an xid <= pruned): a position that may have missed a change for good."""
    return since.xmax <= pruned or any(x <= pruned for x in since.xip)


EXPIRED = (
    "the resume token is older than the change log keeps (SHOP_CHANGES_RETENTION); "
    "start again with a snapshot"
)


def _parse(text: str) -> Any:
    return json.loads(text, parse_float=Decimal)


@dataclass(slots=True)  # not frozen, like FeedChange: one per change
class _Logged:
    """A change read from the log, with its transaction's id (for Segment filtering)."""

    xid: int
    change: FeedChange


@dataclass(frozen=True, slots=True)
class _Step:
    """One poll: the changes between two snapshots (None: more than POLL_CAP rows)."""

    since: Snapshot
    upto: Snapshot
    changes: list[_Logged] | None


_KINDS = {int(k): k for k in ResourceType}
_OPERATIONS = {int(o): o for o in Operation}


async def _decoded(log_: ChangeLog, rows: Sequence[Any]) -> AsyncGenerator[_Logged, None]:
    """Changes rows -> changes, in order, each row parsed only when reached (a page may hold
    64,000 changes: the first go out before the last is parsed); orders get their lines, one
    query for the page's orders."""
    orders = {row.id: _parse(row.rows) for row in rows if row.resource_type == ResourceType.ORDER}
    order_ids = [data["id"] for elements in orders.values() for _, data in elements]
    items = await log_.items(order_ids) if order_ids else {}
    for row in rows:
        kind = _KINDS[row.resource_type]
        elements = orders[row.id] if kind is ResourceType.ORDER else _parse(row.rows)
        xid, changed_at = row.xid, row.changed_at
        for operation, data in elements:
            if kind is ResourceType.ORDER:
                data["items"] = _parse(items.get(data["id"], "[]"))
            change = FeedChange(
                kind, _OPERATIONS[operation], data.get("version", 1), changed_at, data
            )
            yield _Logged(xid, change)


async def _decode(log_: ChangeLog, rows: Sequence[Any]) -> list[_Logged]:
    """_decoded, all at once (a poll's step, shared by every stream)."""
    return [logged async for logged in _decoded(log_, rows)]


@dataclass(slots=True, eq=False)  # identity: each stream its own entry in a set
class _Behind:
    """A stream's lag: since when (time.monotonic()) it has not been caught up; None while it
    is (waiting for the next commit). `mark`: the head's count of committed changes when it
    last was (or when it started)."""

    since: float | None
    mark: int


def _held(steps: Iterable[_Step]) -> int:
    """The changes the kept polls hold."""
    return sum(len(step.changes) for step in steps if step.changes is not None)


class _Head:
    """The newest snapshot this process has seen, and the changes of its last polls: one poll
    every `interval` while the process serves any stream, shared by all of them, so a stream
    that is caught up costs no query and holds no connection."""

    def __init__(self, db: Database, interval: float) -> None:
        self._db = db
        self._interval = interval
        self.latest: Snapshot | None = None
        self.latest_lsn = 0  # the primary's WAL position when `latest` was taken
        # Changes the polls have seen committed (all types), since the process started: a
        # truncated poll (past POLL_CAP rows) counts only the rows it fetched.
        self.committed = 0
        self.steps: deque[_Step] = deque(maxlen=STEPS_KEPT)
        self._moved = asyncio.Event()
        self._nudged = asyncio.Event()  # a commit through this process since the last poll
        self._streams = 0  # polls run while this process serves any stream
        self._task: asyncio.Task[None] | None = None

    def join(self) -> None:
        """A stream starts: poll while it lasts."""
        self._streams += 1
        if self._task is None or self._task.done():
            # Its own context: not the deadline of the call that happened to start it.
            context = contextvars.copy_context()
            self._task = asyncio.get_running_loop().create_task(self._poll(), context=context)

    def leave(self) -> None:
        self._streams -= 1

    def nudge(self) -> None:
        """This process committed a write: poll soon (Database.on_commit calls it)."""
        if self._streams:
            self._nudged.set()

    def step_from(self, since: Snapshot) -> _Step | None:
        for step in self.steps:
            if step.since == since:
                return step
        return None

    async def wait(self, since: Snapshot, seconds: float) -> bool:
        """Until a poll sees something newer than `since` (True) or `seconds` pass."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            if self.latest is not None and _ahead(self.latest, since):
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._moved.wait(), left)
            except TimeoutError:
                return False

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        with deadline_bound(None):
            while self._streams:
                # Cleared before the poll: a commit while it runs (which its snapshot may not
                # see) brings the next one forward.
                self._nudged.clear()
                began = loop.time()
                try:
                    await self._poll_once()
                except Exception as exc:  # the streams read the log themselves meanwhile
                    log.info("change feed poll failed (%s); retrying", type(exc).__name__)
                left = self._interval - (loop.time() - began)
                if left > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._nudged.wait(), left)
                gap = NUDGED_GAP - (loop.time() - began)
                if gap > 0:
                    await asyncio.sleep(gap)

    async def _poll_once(self) -> None:
        since = self.latest
        # On the primary, whatever the calls' route: only its snapshots list every transaction
        # in progress (a standby's pg_current_snapshot() lists none of the primary's).
        with reading_from(PRIMARY):
            opened = self._db.read()
        async with opened as session:
            log_ = ChangeLog(session)
            xmax, xip = (since.xmax, sorted(since.xip)) if since is not None else (NOTHING, [])
            taken = since.taken if since is not None else None
            polled = await log_.poll(xmax, xip, taken, list(ResourceType), POLL_CAP, POLL_CHANGES)
            text, upto_taken, lsn, pruned, rows = polled
            upto = Snapshot.parse(text, upto_taken)
            changes: list[_Logged] | None = []
            if since is not None:
                if not upto.covers(since):  # a new primary, behind the old one: wait for it
                    return
                too_many = len(rows) > POLL_CAP or any(r.rows is None for r in rows)
                if _expired(since, pruned) or too_many:
                    changes = None  # the streams read the log themselves
                else:
                    changes = await _decode(log_, rows)
        if upto == since:
            return
        if since is not None:
            self.committed += sum(row.entries for row in rows)
            self.steps.append(_Step(since, upto, changes))
            while len(self.steps) > 1 and _held(self.steps) > KEPT_CHANGES:
                self.steps.popleft()
        self.latest, self.latest_lsn = upto, lsn
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()


class ChangeFeed:
    """WatchChanges for any transport: a snapshot, then every committed change."""

    def __init__(
        self,
        db: Database,
        *,
        poll_interval: float,
        heartbeat: float,
        readers: int,
        enabled: bool = True,
    ) -> None:
        """`enabled`: the schema has the change log (a server started on an older schema with
        SHOP_ALLOW_SCHEMA_BEHIND refuses WatchChanges rather than fail inside it)."""
        self._db = db
        self._enabled = enabled
        self._poll_interval = poll_interval
        self._heartbeat = heartbeat
        self._head = _Head(db, poll_interval)
        db.on_commit(self._head.nudge)
        self._readers = asyncio.Semaphore(readers)
        self._streams: set[_Behind] = set()

    async def oldest(self) -> Position:
        """A position before every change the log still holds (the relay's start on an empty
        stream): it sees exactly the pruned transactions."""
        async with self._db.read() as session:
            pruned = await ChangeLog(session).pruned_through()
        return Position(Snapshot(pruned + 1, pruned + 1, frozenset()))

    async def watch(
        self,
        start: Position | None,
        types: Iterable[ResourceType],
        max_batch: int,
        *,
        snapshot: bool = False,
    ) -> AsyncGenerator[FeedBatch, None]:
        """From `start` (a resume token's position), or from now, or (`snapshot`) from a
        snapshot of every current resource. Never ends on its own."""
        kinds = sorted(set(types))
        if not self._enabled:
            raise FailedPrecondition(
                "this server runs on a schema from before the change feed (migration 0007); "
                "it is served once the schema is migrated and the server restarted",
                reason="SCHEMA_BEHIND",
            )
        behind = _Behind(time.monotonic(), self._head.committed)
        self._streams.add(behind)
        self._head.join()
        try:
            async for batch in self._follow(start, kinds, max_batch, snapshot, behind):
                yield batch
        finally:
            self._head.leave()
            self._streams.discard(behind)

    def lag(self) -> tuple[int, float, int]:
        """(streams being served, the seconds the furthest behind of them has spent since it
        was last caught up, and the most changes committed since a stream not caught up now
        was last caught up; 0 and 0 when all are): the feed's lag. The changes are the shared
        poll's count, of every type: a stream resumed from an old token counts from its start.
        Safe from another thread (the metrics endpoint's): tuple() copies the set in one step
        under the GIL."""
        streams = tuple(self._streams)
        now, committed = time.monotonic(), self._head.committed
        behind = [
            (now - since, committed - b.mark) for b in streams if (since := b.since) is not None
        ]
        seconds = max((s for s, _ in behind), default=0.0)
        changes = max((c for _, c in behind), default=0)
        return len(streams), seconds, changes

    async def _follow(
        self,
        start: Position | None,
        kinds: list[ResourceType],
        max_batch: int,
        snapshot: bool,
        behind: _Behind,
    ) -> AsyncGenerator[FeedBatch, None]:
        position = start
        if (position is None and snapshot) or (position is not None and position.scan is not None):
            scan = self._scan(position, kinds, max_batch)
            async with aclosing(scan):
                async for batch in scan:
                    position = batch.position
                    yield batch
        if position is None:
            with reading_from(PRIMARY):  # a snapshot from the primary (see _poll_once)
                opened = self._db.read()
            async with opened as session:
                now = Snapshot.parse(*await ChangeLog(session).current_snapshot())
            position = Position(now)
            yield FeedBatch([], position, Event.CAUGHT_UP)
        announce = start is not None or snapshot  # say when a resumed or snapshot stream catches up
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        while True:
            before = position
            step = self._head.step_from(position.since) if position.upto is None else None
            if step is not None and step.changes is not None:
                batches = self._from_step(step, position, kinds, max_batch)
            elif (
                position.upto is not None
                or announce  # a resumed stream reads once, to say it is caught up
                or (self._head.latest is not None and _ahead(self._head.latest, position.since))
            ):
                batches = self._read(position, kinds, max_batch, self._head.latest)
            else:
                behind.since = None  # caught up: waiting for the next commit
                behind.mark = self._head.committed
                quiet = self._heartbeat - (loop.time() - sent_at)
                if quiet <= 0 or not await self._head.wait(position.since, quiet):
                    yield FeedBatch([], position, Event.HEARTBEAT)
                    sent_at = loop.time()
                continue
            if behind.since is None:
                behind.since = time.monotonic()
            async with aclosing(batches):
                async for batch in batches:
                    position = batch.position
                    caught_up = batch.event is Event.CAUGHT_UP
                    if batch.changes or (caught_up and announce):
                        yield batch
                        sent_at = loop.time()
                        announce = False
            if position == before:  # nothing read: a replica not yet replayed to the polls
                await asyncio.sleep(self._poll_interval)
            if loop.time() - sent_at >= self._heartbeat:
                yield FeedBatch([], position, Event.HEARTBEAT)
                sent_at = loop.time()

    async def _scan(
        self, position: Position | None, kinds: list[ResourceType], max_batch: int
    ) -> AsyncGenerator[FeedBatch, None]:
        """The snapshot's rows (OPERATION_SNAPSHOT), max_batch per batch, the last one marked
        SNAPSHOT_DONE. Resumed mid-snapshot, the rest is read in a newer snapshot, and a
        Segment says which changes that one already holds."""
        while True:
            # On the primary: the snapshot's own pg_snapshot is where the tail starts, and a
            # standby's leaves out the transactions in progress on the primary.
            with reading_from(PRIMARY):
                opened = self._db.snapshot()
            async with opened as session:
                log_ = ChangeLog(session)
                at = Snapshot.parse(*await log_.current_snapshot())
                if position is None:
                    position = Position(at, scan=(kinds[0], 0))
                elif not at.covers(position.since):
                    position = position  # a replica behind the token: retry below
                else:
                    assert position.scan is not None
                    if at != position.since:
                        segment = Segment(at, *position.scan)
                        position = replace(position, segments=(*position.segments, segment))
                    async for batch in self._scan_rows(log_, position, kinds, max_batch):
                        yield batch
                    return
            await asyncio.sleep(self._poll_interval)

    async def _scan_rows(
        self, log_: ChangeLog, position: Position, kinds: list[ResourceType], max_batch: int
    ) -> AsyncGenerator[FeedBatch, None]:
        assert position.scan is not None
        first, after_id = position.scan
        taken = datetime.now(UTC)
        sequence = position.sequence
        batch: list[FeedChange] = []
        for kind in kinds:
            if kind < first:
                continue
            pages = log_.rows_after(kind, after_id if kind == first else 0, max_batch)
            async with aclosing(pages):
                async for rows in pages:
                    items = (
                        await log_.items([r.id for r in rows]) if kind is ResourceType.ORDER else {}
                    )
                    for resource_id, text in rows:
                        data = _parse(text)
                        if kind is ResourceType.ORDER:
                            data["items"] = _parse(items.get(resource_id, "[]"))
                        version = data.get("version", 1)
                        batch.append(FeedChange(kind, Operation.SNAPSHOT, version, taken, data))
                        sequence += 1
                        if len(batch) == max_batch:
                            yield FeedBatch(
                                batch,
                                replace(position, sequence=sequence, scan=(kind, resource_id)),
                            )
                            batch = []
        done = Position(position.since, sequence, segments=position.segments)
        yield FeedBatch(batch, done, Event.SNAPSHOT_DONE)

    async def _deliver(
        self,
        position: Position,
        upto: Snapshot,
        changes: AsyncIterable[_Logged],
        max_batch: int,
        kinds: list[ResourceType],
        *,
        newest: bool,
    ) -> AsyncGenerator[FeedBatch, None]:
        """The difference position.since -> upto as batches: the changes of `kinds` not in a
        resumed snapshot, past position.offset; the last batch moves the position to upto,
        and says CAUGHT_UP when upto is the `newest` snapshot known."""
        segments = position.segments
        sequence, sent = position.sequence, 0
        batch: list[FeedChange] = []
        async for logged in changes:
            change = logged.change
            if change.resource_type not in kinds:
                continue
            if segments and _exported(segments, change.resource_type, change.row["id"], logged.xid):
                continue
            sent += 1
            if sent <= position.offset:
                continue
            if len(batch) == max_batch:
                yield FeedBatch(
                    batch, replace(position, sequence=sequence, upto=upto, offset=sent - 1)
                )
                batch = []
            sequence += 1
            batch.append(change)
        kept = tuple(s for s in segments if not upto.covers(s.at))
        final = Position(upto, sequence, segments=kept)
        yield FeedBatch(batch, final, Event.CAUGHT_UP if newest else Event.NONE)

    async def _from_step(
        self, step: _Step, position: Position, kinds: list[ResourceType], max_batch: int
    ) -> AsyncGenerator[FeedBatch, None]:
        assert step.changes is not None

        async def changes() -> AsyncGenerator[_Logged, None]:
            for logged in step.changes or ():
                yield logged

        newest = step.upto == self._head.latest
        batches = self._deliver(position, step.upto, changes(), max_batch, kinds, newest=newest)
        async with aclosing(batches) as b:
            async for batch in b:
                yield batch

    async def _read(
        self,
        position: Position,
        kinds: list[ResourceType],
        max_batch: int,
        target: Snapshot | None,
    ) -> AsyncGenerator[FeedBatch, None]:
        """The difference from position.since read from the log, where the call's reads are
        routed: to position.upto when the position is mid-difference, else to the poller's
        newest snapshot (`target`) when it is ahead of the position (so the stream then takes
        the polls from memory), else, on the primary, to this read's own snapshot.

        On a standby every snapshot is the primary's (its own lists no transaction in
        progress): the read waits until the standby has replayed past the poll that took
        `target`, then keeps only the transactions that snapshot sees. Nothing is handed out
        while the read cannot see everything up to where it would go. A slow client holds
        the read back (server-side cursor), as an export does; at most `readers` streams read
        the log at once."""
        since = position.since
        target_lsn = self._head.latest_lsn
        async with self._readers, self._db.read() as session:
            log_ = ChangeLog(session)
            # Its own statement, before the rows': the rows' snapshot is then taken after the
            # standby had replayed this far. Read in the same statement, the replay position
            # could pass the poll's while the snapshot was older, and rows would be missed.
            replayed = await log_.replayed()
            upto: Snapshot | None = None
            newest = False
            if replayed is not None:  # a standby
                goal = position.upto or target
                ready = (
                    target is not None
                    and goal is not None
                    and replayed >= target_lsn
                    and target.covers(goal)
                    and goal.covers(since)
                )
                if not ready or goal is None:
                    return
                upto, newest = goal, goal == target
            pages = log_.newer(
                since.xmax,
                sorted(since.xip),
                since.taken,
                [int(k) for k in kinds],
                LOG_ROWS_PER_FETCH,
            )
            async with aclosing(pages):
                first = await anext(pages)
                if _expired(since, first[0].pruned):
                    raise FailedPrecondition(EXPIRED, reason="RESUME_TOKEN_EXPIRED")
                if upto is None:  # the primary: its own snapshot is exact
                    seen = Snapshot.parse(first[0].snapshot, first[0].taken)
                    if not seen.covers(since):
                        return
                    upto = position.upto
                    if upto is None:
                        # Join the polls when the newest poll is ahead of the position.
                        aligned = (
                            target is not None
                            and target != since
                            and target.covers(since)
                            and seen.covers(target)
                        )
                        upto = target if aligned and target is not None else seen
                    newest = upto == seen
                visible = upto

                async def changes() -> AsyncGenerator[_Logged, None]:
                    page: Sequence[Any] | None = first
                    while page is not None:
                        wanted = [r for r in page if r.id is not None and visible.sees(r.xid)]
                        async for logged in _decoded(log_, wanted):
                            yield logged
                        page = await anext(pages, None)

                batches = self._deliver(position, upto, changes(), max_batch, kinds, newest=newest)
                async with aclosing(batches):
                    async for batch in batches:
                        yield batch


async def prune(db: Database, retention: timedelta, batch: int = 10_000) -> int:
    """Forget the changes older than `retention`, `batch` at a time, each batch its own
    transaction (short locks, no long transaction); the number forgotten. A stream whose
    position falls behind what is kept ends RESUME_TOKEN_EXPIRED."""
    cutoff = datetime.now(UTC) - retention

    async def prune_batch(session: AsyncSession) -> int:
        return await ChangeLog(session).prune(cutoff, batch)

    total = 0
    while pruned := await db.write(prune_batch):
        total += pruned
    return total
