"""Pay a statement's cost once per batch: callers queue a request and await its own outcome;
one task takes whatever queued while the previous batch ran and answers them all together.

Python's per-statement cost through SQLAlchemy (~0.5 ms of CPU more than the bare driver, and
~0.9-1.2 ms in all on this machine) is the ceiling of every unary path; a batch of 16 pays it
once. A lone caller's batch starts on the next turn of the event loop (one in flight stays one
statement), and under load the batch is whatever arrived during the last one, so the batch size
follows the load by itself. With a `linger`, a batcher under load also waits that long before
taking its requests (see Coalescer). Used by the group commit for money (app/money_writer.py)
and the coalesced point reads (GetUser, GetAccount)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Generic, Protocol, TypeAlias, TypeVar

log = logging.getLogger(__name__)

# The linger's trigger (Coalescer): the moving average of requests per batch beyond the first
# (each batch weighs PRESSURE_WEIGHT) from which a batcher is under load, and the time without
# a batch ending after which it is not any more.
PRESSURE_FROM = 0.25
PRESSURE_WEIGHT = 1 / 16
IDLE_RESET = 0.01

In = TypeVar("In")
Out = TypeVar("Out")

# What a batch function returns for each request, in order: its result, or the exception that
# request alone should raise (one transfer's INSUFFICIENT_FUNDS is not its neighbours').
Outcome: TypeAlias = Out | BaseException
Batch: TypeAlias = Callable[[Sequence[In]], Awaitable[Sequence[Outcome[Out]]]]


class BatchTracing(Protocol):
    """What tracing makes of a batch (service/observability/tracing.py, with OpenTelemetry). A
    batch runs in a task of its own, for many calls at once: it gets a span of its own, current
    while it runs (its SQL spans are its children), which links to the span of each call it
    serves, taken when that call queued."""

    def caller(self) -> object | None:
        """The calling span, when a request queues (None: nothing to link to)."""

    def batch(self, name: str, size: int, callers: Sequence[object]) -> AbstractContextManager[Any]:
        """The batch's span, linking to `callers`, current inside the `with`."""


class Coalescer(Generic[In, Out]):
    """Runs `batch` over queued requests, at most `max_batch` at a time and `concurrency`
    batches at once (each on its own connection). A batch starts beside a running one only
    when at least `overlap_from` requests wait: smaller ones are better off joining the next
    batch, which pays the per-batch cost once for all of them.

    With `cancel_abandoned` (reads, which have nothing to finish for anyone), a request whose
    caller went away leaves the queue, and a running batch whose callers have all gone away is
    cancelled: its statement stops server-side instead of running on for no one (a lone
    GetUser cut off by its deadline, say). Writes leave it off: their batch always finishes.

    With `tracing`, each batch runs in a span called `name` that links to its callers' spans;
    without it, nothing of tracing is touched.

    With a `linger` (seconds), a batch waits that long before it takes its requests, but only
    while the batcher is under load: while its recent batches found other requests queued
    beside the first (`pressure`, a moving average of the requests per batch beyond the first,
    at least PRESSURE_FROM). On a machine whose cores the clients share, calls reach the server
    one by one even at 16 in flight, so a batch that starts at once serves 1.4 of them; the
    linger lets the calls already on their way join it, and the per-batch cost is paid once for
    3-4 (GetUser at 16 in flight: 400 -> 253 us of server CPU per call, 2,500 -> 3,900 calls/s;
    docs/benchmark-profiles.md). A caller alone never waits: it finds no one beside it, so the
    pressure stays at 0 (and goes back to 0 after IDLE_RESET without a batch)."""

    def __init__(
        self,
        batch: Batch[In, Out],
        *,
        max_batch: int,
        concurrency: int = 1,
        overlap_from: int = 1,
        cancel_abandoned: bool = False,
        linger: float = 0.0,
        name: str = "batch",
        tracing: BatchTracing | None = None,
    ) -> None:
        self._batch = batch
        self._linger = linger
        self._pressure = 0.0
        self._last_end = 0.0
        # While a batch lingers: what ends the wait, and how many queued end it early.
        self._lingering: asyncio.Future[None] | None = None
        self._company = 0
        self._name = name
        self._tracing = tracing
        self._max_batch = max_batch
        self._slots = concurrency
        self._overlap_from = overlap_from
        self._cancel_abandoned = cancel_abandoned
        # Each request, its caller's future and its caller's span (when tracing).
        self._queue: list[tuple[In, asyncio.Future[Out], object | None]] = []
        # A batch's task that is created and has not taken its requests yet.
        self._starting: asyncio.Task[None] | None = None
        # Each running batch with its callers' futures.
        self._running: dict[asyncio.Task[None], list[asyncio.Future[Out]]] = {}
        # Batches run and the requests they took, since start (read by /metrics).
        self.batches = 0
        self.requests = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def queued(self) -> int:
        """Requests queued for a batch that has not taken them yet."""
        return len(self._queue)

    @property
    def waiting(self) -> int:
        """Requests queued or in a running batch, not yet answered."""
        running = sum(1 for futures in self._running.values() for f in futures if not f.done())
        return len(self._queue) + running

    async def submit(self, request: In) -> Out:
        """The request's own outcome. A caller cancelled while waiting does not take its request
        out of a batch already running: the batch finishes for everyone in it (a write is then
        found under its request_id)."""
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)
        self._queue.append((request, future, self._caller()))
        self._start_batches()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self._abandon([future])
            raise

    async def submit_many(self, requests: Sequence[In]) -> list[Outcome[Out]]:
        """Each request's outcome, in order (a batch RPC's items: they may span batches)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Out]] = [loop.create_future() for _ in requests]
        for future in futures:
            future.add_done_callback(_retrieved)
        caller = self._caller()
        self._queue.extend((r, f, caller) for r, f in zip(requests, futures, strict=True))
        self._start_batches()
        try:
            await asyncio.shield(asyncio.gather(*futures, return_exceptions=True))
        except asyncio.CancelledError:
            self._abandon(futures)
            raise
        return [f.exception() or f.result() for f in futures]

    def _abandon(self, futures: Sequence[asyncio.Future[Out]]) -> None:
        """The callers of `futures` went away: with cancel_abandoned, drop their queued
        requests and cancel each running batch that no caller waits for any more."""
        if not self._cancel_abandoned:
            return
        for future in futures:
            future.cancel()
        self._queue = [queued for queued in self._queue if not queued[1].cancelled()]
        for task, waiting in self._running.items():
            # A batch that has not taken its requests yet (waiting is empty) takes only live
            # ones when it runs: cancelling it would leave nothing to start the next batch.
            if waiting and all(f.cancelled() for f in waiting):
                task.cancel()

    def _start_batches(self) -> None:
        """Start a batch if a slot is free and none is already about to start. The batch takes
        its requests when its task first runs, one turn of the event loop later: the calls
        that became ready in the same turn (under load, all that queued while the last batch
        ran) join it, instead of the first caller running alone."""
        if self._lingering is not None and len(self._queue) >= self._company:
            _settle(self._lingering)
        if self._starting is not None or not self._queue or len(self._running) >= self._slots:
            return
        if self._running and len(self._queue) < self._overlap_from:
            return
        task = asyncio.create_task(self._run())
        self._starting = task
        self._running[task] = []
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        del self._running[task]
        if self._starting is task:
            # Cancelled before it ran (a drain at shutdown): it never took its requests.
            self._starting = None
        if not task.cancelled() and task.exception() is not None:
            # _run answers every caller, whatever the batch raised: this is a bug of its own.
            log.error("a batch failed outside its callers", exc_info=task.exception())
        self._start_batches()

    async def _run(self) -> None:
        if self._linger and self._under_load():
            await self._wait_for_company()
        self._starting = None
        taken, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
        task = asyncio.current_task()
        assert task is not None
        self._running[task] = [f for _, f, _ in taken]
        self._start_batches()  # more than a batch queued: the next slot takes the rest
        if not taken:
            return
        self.batches += 1
        self.requests += len(taken)
        self._pressure += (len(taken) - 1 - self._pressure) * PRESSURE_WEIGHT
        try:
            with self._span(taken):
                outcomes: Sequence[Outcome[Out]] = await self._batch([r for r, _, _ in taken])
            if len(outcomes) != len(taken):
                raise AssertionError(f"{len(outcomes)} outcomes for {len(taken)} requests")
        except asyncio.CancelledError:
            for _, future, _ in taken:
                future.cancel()
            raise
        except Exception as exc:  # every caller gets the batch's failure
            outcomes = [exc] * len(taken)
        for (_, future, _), outcome in zip(taken, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        self._last_end = asyncio.get_running_loop().time()

    async def _wait_for_company(self) -> None:
        """The linger: until `linger` has passed, or the requests queued are two more than
        recent batches took (the company expected has arrived: waiting longer mostly delays
        it). GetUser at 4 in flight, ending at one more: 2,000-2,300 calls/s; at two more:
        2,100 like no linger at all, for 360 against 490 us of server CPU per call; at 16 in
        flight, two more gathered larger batches than one more: 275 against 306 us."""
        loop = asyncio.get_running_loop()
        self._company = int(self._pressure) + 3
        self._lingering = arrived = loop.create_future()
        timer = loop.call_later(self._linger, _settle, arrived)
        try:
            if len(self._queue) < self._company:
                await arrived
        finally:
            timer.cancel()
            self._lingering = None

    def _under_load(self) -> bool:
        """Whether recent batches found company enough for a linger to gather more; after
        IDLE_RESET without a batch ending, the load is gone and the pressure starts again at 0."""
        if asyncio.get_running_loop().time() - self._last_end > IDLE_RESET:
            self._pressure = 0.0
        return self._pressure >= PRESSURE_FROM and len(self._queue) < self._max_batch

    def _caller(self) -> object | None:
        return None if self._tracing is None else self._tracing.caller()

    def _span(
        self, taken: Sequence[tuple[In, asyncio.Future[Out], object | None]]
    ) -> AbstractContextManager[Any]:
        """The batch's span: none without tracing. The batch's task was started from one
        caller's context (or a previous batch's), so the span is what makes its SQL the
        batch's own rather than that one caller's."""
        if self._tracing is None:
            return contextlib.nullcontext()
        callers = [caller for _, _, caller in taken if caller is not None]
        return self._tracing.batch(self._name, len(taken), callers)

    async def drain(self, seconds: float) -> None:
        """Let the batches running now finish, for up to `seconds`; then cancel the
        rest (a batch waiting on a lock that is not let go): its transaction rolls back, and
        nothing of it is applied. Requests still queued are refused."""
        for _, future, _ in self._queue:
            future.cancel()
        self._queue = []
        if self._lingering is not None:  # nothing left to wait for
            _settle(self._lingering)
        running = list(self._running)
        if not running:
            return
        _, late = await asyncio.wait(running, timeout=seconds)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark an outcome as seen: a caller that went away (cancelled, deadline passed) must not
    leave 'exception was never retrieved' in the log for an operator to chase."""
    if not future.cancelled():
        future.exception()
