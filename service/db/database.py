"""The one data layer the application sees: it owns the engine and hands out units of work
through three doors, each with one kind of handle. Nothing else reaches for a sessionmaker, an
engine or a driver connection.

1. Reads, an AsyncSession:
   - read(): a session for reads (no explicit transaction; closed at the end).
   - snapshot(): one REPEATABLE READ, READ ONLY transaction, for exports.
   Both on a read replica when the RPC's route says so (bound per call from the gRPC room's
   per-method table, service/db/routing.py) and one is usable (service/db/replicas.py); on the
   primary otherwise.
2. Writes, an AsyncSession in a transaction:
   - write(work): work(session) in a transaction, committed, retried on 40001/40P01
     (service/app/idempotency.py runs it once per request_id).
   - transaction(): one transaction, not retried (work that cannot run twice: ImportUsers).
   snapshot() and transaction() hold their connection for as long as a client streams: at most
   `stream_connections` of them at once (StreamSlots), so the rest of the pool stays for the
   short doors.
3. Batchers, an AsyncConnection per batch:
   - point_reads(read): concurrent point reads answered by one statement per batch.
   - batched(apply): concurrent writes applied together in one transaction per batch (group
     commit: transfers, deposits, withdrawals).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from service.db.coalescer import BatchTracing, Coalescer, Outcome
from service.db.deadlines import DeadlinePassed, current_deadline, deadline_bound
from service.db.errors import is_unavailable
from service.db.replicas import Replica, Replicas
from service.db.retry import retried, transactional
from service.db.routing import REPLICA, current_reads_from
from service.db.transaction import AUTOCOMMIT_READS, read_only_snapshot, transaction

T = TypeVar("T")
In = TypeVar("In")
Out = TypeVar("Out")

# Each batch is one transaction on one pooled connection. A second batch beside a running one
# only for a large queue (BatchTransfer calls), where one batch's database time can hide the
# other's Python work: `make bench`, BatchTransfer of 1000 x 4 in flight, 6.5k transfers/s with
# two at once against 5.5k with one. Unary calls instead wait and join the next batch: Transfer
# at 16 in flight went from 3.7 to 7.4 transfers per transaction and 678 to 858 transfers/s.
WRITE_BATCHES = 2
OVERLAP_FROM = 64
# Point-read batches in a row on one kept connection before it goes back to the pool once
# (_KeptConnections): the pool's other waiters get their turn, the checkout is still paid once
# in 64 batches.
KEPT_BATCHES = 64
# How long a point-read batch waits for company while the batcher is under load (Coalescer's
# linger; never for a lone caller). At 16 in flight a call reaches the server every 0.3-0.4 ms:
# GetUser's batches went from 1.4 to 3.8 calls (make bench), its CPU per call from 400 to 253 us.
POINT_READ_LINGER = 0.001


class StreamSlotsFull(Exception):
    """Every stream slot is held; service/app/failures.py says what that means to a client
    (RESOURCE_EXHAUSTED / TOO_MANY_STREAMS, with a retry delay)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"all {limit} stream slots are held")
        self.limit = limit


class StreamSlots:
    """How many streaming calls may hold a connection at once; past that, one more is refused
    at once (StreamSlotsFull: RESOURCE_EXHAUSTED, with a retry delay), never queued.

    An export holds its connection and snapshot for as long as its reader takes (bounded by
    SHOP_STREAM_STALL_TIMEOUT only while it takes nothing), so without a bound 30 exports that
    read slowly held every pooled connection and a GetUser beside them waited out
    SHOP_POOL_TIMEOUT for UNAVAILABLE. Refused rather than queued: a queue would hold calls
    open invisibly behind readers that may never return, while a refusal tells the client to
    come back (RetryInfo) and costs the server nothing. One budget for the process rather than
    per caller: behind Envoy every call comes from Envoy's address and a token names a calling
    service, not a person, so a per-caller key would be either meaningless or as coarse as this.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.held = 0

    @asynccontextmanager
    async def hold(self, opened: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
        if self.limit is not None and self.held >= self.limit:
            raise StreamSlotsFull(self.limit)
        self.held += 1
        try:
            async with opened as value:
                yield value
        finally:
            self.held -= 1


class Database:
    """The engine, its sessions, and the doors to them."""

    def __init__(
        self,
        engine: AsyncEngine,
        sessions: async_sessionmaker[AsyncSession],
        replicas: Replicas | None = None,
        stream_connections: int | None = None,
        tracing: BatchTracing | None = None,
    ) -> None:
        self._engine = engine
        # Off behind PgBouncer (db/engine.py): an engine's execution options are fixed for its
        # life, so this is read once, not per statement.
        self._autocommit_reads = bool(engine.get_execution_options().get(AUTOCOMMIT_READS, True))
        self._tracing = tracing  # the batchers' spans (db/coalescer.py); None: tracing is off
        self._sessions = sessions
        self._replicas = replicas
        self.streams = StreamSlots(stream_connections)
        self._coalescers: list[Coalescer[Any, Any]] = []
        self._kept: list[_KeptConnections] = []
        self._commit_listeners: list[Callable[[], None]] = []

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call `listener` (at once, synchronously: it must only take note) after every commit
        through the write doors and batchers: the change feed polls sooner when this process
        has just written."""
        self._commit_listeners.append(listener)

    def _committed(self) -> None:
        for listener in self._commit_listeners:
            listener()

    async def start_replicas(self) -> None:
        """Check every replica once, so reads use them from the first call; then keep checking."""
        if self._replicas is not None:
            await self._replicas.check_all()
            self._replicas.start()

    async def close_replicas(self, seconds: float) -> None:
        """Stop checking the replicas and close their pools, within `seconds` each."""
        if self._replicas is not None:
            await self._replicas.close(seconds)

    def read(self) -> AbstractAsyncContextManager[AsyncSession]:
        replica = self._replica()
        if replica is None:
            return self._sessions()
        return self._on_replica(replica, connected)

    def snapshot(self) -> AbstractAsyncContextManager[AsyncSession]:
        replica = self._replica()
        if replica is None:
            return self.streams.hold(read_only_snapshot(self._sessions))
        return self.streams.hold(self._on_replica(replica, read_only_snapshot))

    def _replica(self) -> Replica | None:
        """Where this RPC's reads go: a usable replica if routing.py sends them to one."""
        if self._replicas is None or current_reads_from() is not REPLICA:
            return None
        return self._replicas.pick()

    @asynccontextmanager
    async def _on_replica(self, replica: Replica, opened: Opener) -> AsyncIterator[AsyncSession]:
        """`opened` on the replica, its connection taken before the caller's block runs. When
        that fails as an outage (the replica went down since its last check), nothing has been
        read yet: the replica is marked down and the block runs on the primary instead. A
        replica failing later, mid-read, fails the call (UNAVAILABLE; an export resumes from
        its last token) and is marked down too, so the client's retry reads elsewhere."""
        assert self._replicas is not None
        on: Replica | None = replica
        async with AsyncExitStack() as stack:
            try:
                session = await stack.enter_async_context(opened(replica.sessions))
            except Exception as exc:
                if not is_unavailable(exc):
                    raise
                self._replicas.mark_down(replica, exc)
                on = None
            if on is None:
                session = await stack.enter_async_context(opened(self._sessions))
            try:
                yield session
            except Exception as exc:
                if on is not None and is_unavailable(exc):
                    self._replicas.mark_down(on, exc)
                raise

    async def write(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        result = await transactional(self._sessions, work)
        self._committed()
        return result

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One transaction, committed at the end and not retried: for work that cannot run
        twice (ImportUsers reads its client stream once)."""
        async with self.streams.hold(transaction(self._sessions)) as session:
            yield session
        self._committed()

    @asynccontextmanager
    async def _statement(self) -> AsyncIterator[AsyncConnection]:
        """A Core connection for one read statement: autocommit (no BEGIN, no COMMIT), except
        behind PgBouncer in transaction mode, where a statement's prepare and execute must
        share a transaction to reach the same server connection."""
        async with self._engine.connect() as conn:
            if self._autocommit_reads:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    def point_reads(
        self,
        read: Callable[[AsyncConnection, Sequence[In]], Awaitable[Sequence[Outcome[Out]]]],
        *,
        name: str = "point read batch",
        max_batch: int = 256,
    ) -> Coalescer[In, Out]:
        """Concurrent point reads answered together: read(conn, keys) runs one statement for
        the batch and returns each key's outcome. A batch whose callers have all gone away
        (cancelled, deadline passed) is cancelled, its statement with it. `name` names its
        batches' spans when tracing is on."""

        async def run(keys: Sequence[In]) -> Sequence[Outcome[Out]]:
            # The batch's task was started from one caller's context: its deadline is not the
            # batch's (behind PgBouncer the read's transaction would take it as its
            # statement_timeout, and fail every caller once that one's had passed). The batch
            # is bounded by its callers' cancellations instead, as autocommit reads are.
            with deadline_bound(None):
                return await connection.run(lambda conn: read(conn, keys))

        def more_queued() -> bool:
            # Autocommit only: behind PgBouncer each read is a transaction of its own.
            return self._autocommit_reads and bool(reads.queued)

        connection = _KeptConnections(self._statement, more_queued)
        self._kept.append(connection)

        # One batch at a time: a point read is one short statement with no locks to wait for,
        # and the calls that arrive while it runs make the next batch. Two at once split them
        # into batches half the size, each paying SQLAlchemy's per-statement cost: GetUser's
        # server CPU per call was 1.27-1.60 ms at 16 and 64 in flight, against 0.89-1.18 ms.
        reads: Coalescer[In, Out] = Coalescer(
            run,
            max_batch=max_batch,
            concurrency=1,
            cancel_abandoned=True,
            linger=POINT_READ_LINGER,
            name=name,
            tracing=self._tracing,
        )
        self._coalescers.append(reads)
        return reads

    def batched(
        self,
        apply: Callable[[AsyncConnection, Sequence[In]], Awaitable[Sequence[Outcome[Out]]]],
        *,
        name: str = "write batch",
        max_batch: int = 256,
    ) -> BatchedWriter[In, Out]:
        """Concurrent writes applied together: apply(conn, items) runs in one transaction per
        batch, committed when it returns, and the whole batch runs again on a serialization
        failure or deadlock (service/db/retry.py). `name` names its batches' spans (one span
        for all the attempts) when tracing is on."""
        writer = BatchedWriter(
            self._engine,
            apply,
            max_batch=max_batch,
            committed=self._committed,
            name=name,
            tracing=self._tracing,
        )
        self._coalescers.append(writer.coalescer)
        self._kept.append(writer.connections)
        return writer

    def batch_counts(self) -> list[tuple[str, int, int]]:
        """Each batcher's name, the batches it ran and the requests they took, since start."""
        return [(c.name, c.batches, c.requests) for c in self._coalescers]

    def waiting(self) -> int:
        """Calls waiting for a batch's answer, queued or in a running batch."""
        return sum(c.waiting for c in self._coalescers)

    async def drain(self, seconds: float) -> None:
        """At shutdown, before the pool closes: the batches running now get `seconds`
        to finish (a money batch commits for the callers in it, whether or not they are still
        waiting), then are cancelled and roll back."""
        await asyncio.gather(*(c.drain(seconds) for c in self._coalescers))
        for connection in self._kept:
            await connection.release()


class _KeptConnections:
    """A batcher's connections, kept from one batch to the next while calls queue.

    Taking a connection from the pool and giving it back costs more CPU than a point read's
    statement itself: a batch of two ids took 370 us with a checkout per batch and 150 us on a
    connection kept (in isolation, uvloop). Under load a batch starts as soon as the previous
    one ends, so a batch that ends with calls queued keeps its connection for the next one; one
    that ends with none queued gives it back at once, so an idle server holds none. A batch that
    fails or is cancelled gives its connection back (SQLAlchemy closes it, or discards it after
    a disconnect) and the next one takes a fresh one. At most `most` are kept (the batches the
    batcher runs at once), and each goes back after KEPT_BATCHES batches in a row all the same,
    so a call waiting for the pool (a small pool, another batcher) gets it within that many
    short batches. GetUser at 16 in flight, alternating runs with and without it: 500-640
    against 680-965 us of server CPU per call."""

    def __init__(
        self,
        opener: Callable[[], AbstractAsyncContextManager[AsyncConnection]],
        keep: Callable[[], bool],
        most: int = 1,
    ) -> None:
        self._opener = opener
        self._keep = keep
        self._most = most
        # Each kept connection with what closes it and the batches it has run in a row.
        self._idle: list[tuple[AsyncExitStack, AsyncConnection, int]] = []

    async def run(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        if self._idle:
            stack, conn, batches = self._idle.pop()
        else:
            stack = AsyncExitStack()
            conn = await stack.enter_async_context(self._opener())
            batches = 0
        try:
            result = await work(conn)
        except BaseException:
            await stack.aclose()
            raise
        batches += 1
        if batches < KEPT_BATCHES and len(self._idle) < self._most and self._keep():
            self._idle.append((stack, conn, batches))
        else:
            await stack.aclose()
        return result

    async def release(self) -> None:
        """Every kept connection back to the pool (at shutdown)."""
        idle, self._idle = self._idle, []
        for stack, _conn, _batches in idle:
            await stack.aclose()


Opener = Callable[[async_sessionmaker[AsyncSession]], AbstractAsyncContextManager[AsyncSession]]


@asynccontextmanager
async def connected(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session from `sessions` that already holds its connection (so a server that cannot be
    reached fails here, before the caller reads anything)."""
    async with sessions() as session:
        await session.connection()
        yield session


@dataclass(frozen=True, slots=True)
class _Queued(Generic[In]):
    item: In
    deadline: float | None  # event-loop time; None: the caller set none


class BatchedWriter(Generic[In, Out]):
    """Group commit. A caller's deadline travels with its item: an item whose deadline passed
    before its batch began is answered DeadlinePassed without being applied, and the batch's
    statement_timeout is the latest deadline among the rest (none if one has none)."""

    def __init__(
        self,
        engine: AsyncEngine,
        apply: Callable[[AsyncConnection, Sequence[In]], Awaitable[Sequence[Outcome[Out]]]],
        *,
        max_batch: int,
        committed: Callable[[], None] = lambda: None,
        name: str = "write batch",
        tracing: BatchTracing | None = None,
    ) -> None:
        self._engine = engine
        self._apply = apply
        self._committed = committed
        self.coalescer: Coalescer[_Queued[In], Out] = Coalescer(
            self._run,
            max_batch=max_batch,
            concurrency=WRITE_BATCHES,
            overlap_from=OVERLAP_FROM,
            name=name,
            tracing=tracing,
        )
        # One kept per batch running at once: a checkout per batch is not paid under load.
        self.connections = _KeptConnections(
            engine.connect, lambda: bool(self.coalescer.queued), most=WRITE_BATCHES
        )

    async def submit(self, item: In) -> Out:
        return await self.coalescer.submit(_Queued(item, current_deadline()))

    async def submit_many(self, items: Sequence[In]) -> list[Outcome[Out]]:
        deadline = current_deadline()
        return await self.coalescer.submit_many([_Queued(i, deadline) for i in items])

    async def _run(self, queued: Sequence[_Queued[In]]) -> Sequence[Outcome[Out]]:
        now = asyncio.get_running_loop().time()
        live = [i for i, q in enumerate(queued) if q.deadline is None or q.deadline > now]
        outcomes: list[Outcome[Out]] = [DeadlinePassed()] * len(queued)
        if not live:
            return outcomes
        deadlines = [queued[i].deadline for i in live]
        latest = None if None in deadlines else max(d for d in deadlines if d is not None)
        items = [queued[i].item for i in live]

        async def in_transaction(conn: AsyncConnection) -> Sequence[Outcome[Out]]:
            async with conn.begin():
                return await self._apply(conn, items)

        async def attempt() -> Sequence[Outcome[Out]]:
            with deadline_bound(latest):
                return await self.connections.run(in_transaction)

        applied = await retried(attempt)
        self._committed()
        for i, outcome in zip(live, applied, strict=True):
            outcomes[i] = outcome
        return outcomes
