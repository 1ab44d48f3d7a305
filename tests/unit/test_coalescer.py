"""The coalescer's own bookkeeping (service/db/coalescer.py), with a batch function that
records what it was given: no database, the shape alone."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import pytest

from service.db import coalescer as coalescer_module
from service.db.coalescer import Coalescer, Outcome

BOUND = 5.0


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(BOUND):
        while not condition():  # noqa: ASYNC110 - the coalescer has no event to wait on
            await asyncio.sleep(0)


class Recorder:
    """Logs each batch as it starts (`batches`) and again as it returns its outcomes
    (`finished`): a batch cancelled on the way is in the first list only."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.finished: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.on_return: Callable[[], object] = lambda: None

    async def __call__(self, requests: Sequence[int]) -> Sequence[Outcome[int]]:
        self.batches.append(list(requests))
        await self.release.wait()
        self.on_return()
        self.finished.append(list(requests))
        return [r * 10 for r in requests]


async def test_calls_made_in_one_turn_of_the_loop_share_a_batch() -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder, max_batch=100)
    answers = await asyncio.wait_for(
        asyncio.gather(*(coalescer.submit(n) for n in range(8))), BOUND
    )
    assert answers == [n * 10 for n in range(8)]
    assert recorder.batches == [list(range(8))]


async def test_calls_queued_while_a_batch_runs_make_the_next_batch() -> None:
    recorder = Recorder()
    recorder.release.clear()
    coalescer: Coalescer[int, int] = Coalescer(recorder, max_batch=100)
    first = asyncio.ensure_future(coalescer.submit(0))
    await until(lambda: bool(recorder.batches))
    rest = [asyncio.ensure_future(coalescer.submit(n)) for n in range(1, 6)]
    await asyncio.sleep(0.01)
    assert coalescer.waiting == 6
    recorder.release.set()
    assert await asyncio.wait_for(asyncio.gather(first, *rest), BOUND) == [0, 10, 20, 30, 40, 50]
    assert recorder.batches == [[0], [1, 2, 3, 4, 5]]


async def test_a_caller_gone_before_its_batch_started_does_not_stall_the_next_ones() -> None:
    """A read whose caller goes away after the next batch's task was created and before that
    task's first step (its requests not taken yet): the batch must still run, skipping it, or
    no batch ever starts again. The order is forced: the queued caller's cancellation is
    scheduled as the running batch returns, so it lands between the finished batch's callback
    (which creates the next batch's task) and that task's first step."""
    recorder = Recorder()
    recorder.release.clear()
    coalescer: Coalescer[int, int] = Coalescer(recorder, max_batch=100, cancel_abandoned=True)
    running = asyncio.ensure_future(coalescer.submit(0))
    await until(lambda: bool(recorder.batches))
    queued = asyncio.ensure_future(coalescer.submit(1))
    await until(lambda: coalescer.waiting == 2)
    loop = asyncio.get_running_loop()
    recorder.on_return = lambda: loop.call_soon(queued.cancel)
    recorder.release.set()
    assert await asyncio.wait_for(running, BOUND) == 0
    with pytest.raises(asyncio.CancelledError):
        await queued
    recorder.on_return = lambda: None
    assert await asyncio.wait_for(coalescer.submit(2), BOUND) == 20


async def test_a_write_batch_runs_on_for_a_caller_that_went_away() -> None:
    recorder = Recorder()
    recorder.release.clear()
    coalescer: Coalescer[int, int] = Coalescer(recorder, max_batch=100)
    gone = asyncio.ensure_future(coalescer.submit(7))
    await until(lambda: bool(recorder.batches))
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    recorder.release.set()
    assert await asyncio.wait_for(coalescer.submit(8), BOUND) == 80
    # The first batch ran to its end for no one, not cancelled and run again with the next.
    assert recorder.batches == [[7], [8]]
    assert recorder.finished == [[7], [8]]


async def test_a_second_batch_starts_beside_a_running_one_only_for_a_large_queue() -> None:
    recorder = Recorder()
    recorder.release.clear()
    coalescer: Coalescer[int, int] = Coalescer(
        recorder, max_batch=100, concurrency=2, overlap_from=4
    )
    first = asyncio.ensure_future(coalescer.submit(0))
    await until(lambda: bool(recorder.batches))
    few = [asyncio.ensure_future(coalescer.submit(n)) for n in (1, 2, 3)]
    await asyncio.sleep(0.01)
    assert len(recorder.batches) == 1  # three wait: they join the next batch
    many = [asyncio.ensure_future(coalescer.submit(n)) for n in (4, 5)]
    await asyncio.sleep(0.01)
    assert recorder.batches[1:] == [[1, 2, 3, 4, 5]]  # five wait: a second batch starts
    recorder.release.set()
    await asyncio.wait_for(asyncio.gather(first, *few, *many), BOUND)


async def test_drain_cancels_a_batch_that_outlives_its_window() -> None:
    recorder = Recorder()
    recorder.release.clear()
    coalescer: Coalescer[int, int] = Coalescer(recorder, max_batch=100)
    stuck = asyncio.ensure_future(coalescer.submit(1))
    await until(lambda: bool(recorder.batches))
    await asyncio.wait_for(coalescer.drain(0.05), BOUND)
    with pytest.raises(asyncio.CancelledError):
        await stuck
    assert coalescer.waiting == 0


CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)


class FakeTracing:
    """A BatchTracing whose 'span' is a name in a context variable: each call sets its own."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int, list[object]]] = []

    def caller(self) -> object | None:
        return CALLER.get()

    @contextlib.contextmanager
    def batch(self, name: str, size: int, callers: Sequence[object]) -> Iterator[None]:
        self.batches.append((name, size, list(callers)))
        token = CALLER.set(name)
        try:
            yield
        finally:
            CALLER.reset(token)


async def test_a_traced_batch_runs_in_its_own_span_linking_each_caller() -> None:
    """Each batch gets the callers it serves, taken when they queued, whichever caller's context
    its task was started from; inside it, the batch's span is current, not a caller's."""
    tracing = FakeTracing()
    recorder = Recorder()
    recorder.release.clear()
    seen: list[str | None] = []

    async def batch(requests: Sequence[int]) -> Sequence[Outcome[int]]:
        seen.append(CALLER.get())
        return await recorder(requests)

    coalescer: Coalescer[int, int] = Coalescer(batch, max_batch=100, name="reads", tracing=tracing)

    async def call(caller: str | None, *requests: int) -> object:
        CALLER.set(caller)
        if len(requests) == 1:
            return await coalescer.submit(requests[0])
        return await coalescer.submit_many(requests)

    first = asyncio.ensure_future(call("a", 1))
    await until(lambda: bool(recorder.batches))
    rest = [
        asyncio.ensure_future(call("b", 2)),
        asyncio.ensure_future(call(None, 3)),  # no span: nothing to link
        asyncio.ensure_future(call("c", 4, 5)),  # one link for both items
    ]
    await until(lambda: coalescer.waiting == 5)
    recorder.release.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), BOUND)
    assert tracing.batches == [("reads", 1, ["a"]), ("reads", 4, ["b", "c", "c"])]
    assert seen == ["reads", "reads"]


# --- The linger under load ------------------------------------------------------------------

LONG = 60.0  # a linger no test waits out: a call that returns within BOUND did not linger


async def _under_load(coalescer: Coalescer[int, int]) -> None:
    """One batch of 8 calls made together: 7 beside the first, so the batcher is under load."""
    await asyncio.wait_for(asyncio.gather(*(coalescer.submit(n) for n in range(8))), BOUND)


async def test_a_lone_caller_never_lingers() -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder, max_batch=100, linger=LONG)
    for n in range(20):
        assert await asyncio.wait_for(coalescer.submit(n), BOUND) == n * 10
    assert recorder.batches == [[n] for n in range(20)]


async def test_under_load_a_batch_lingers_for_calls_on_their_way() -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder, max_batch=100, linger=0.3)
    await _under_load(coalescer)
    first = asyncio.ensure_future(coalescer.submit(100))
    await asyncio.sleep(0.05)  # another turn, and another: without a linger, a batch of one
    second = asyncio.ensure_future(coalescer.submit(101))
    assert await asyncio.wait_for(asyncio.gather(first, second), BOUND) == [1000, 1010]
    assert recorder.batches == [list(range(8)), [100, 101]]


async def test_the_linger_ends_once_the_company_expected_has_arrived() -> None:
    """Under load (7 beside the first, weighed 1/16: company of 3 expected), a batch that
    would linger a minute starts as soon as three calls are queued."""
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder, max_batch=100, linger=LONG)
    await _under_load(coalescer)
    first = asyncio.ensure_future(coalescer.submit(100))
    await asyncio.sleep(0.01)
    rest = [asyncio.ensure_future(coalescer.submit(n)) for n in (101, 102)]
    assert await asyncio.wait_for(asyncio.gather(first, *rest), BOUND) == [1000, 1010, 1020]
    assert recorder.batches == [list(range(8)), [100, 101, 102]]


async def test_the_load_is_forgotten_after_a_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coalescer_module, "IDLE_RESET", 0.05)
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder, max_batch=100, linger=LONG)
    await _under_load(coalescer)
    await asyncio.sleep(0.1)
    assert await asyncio.wait_for(coalescer.submit(100), BOUND) == 1000


async def test_a_drain_ends_the_linger_and_refuses_the_queued_callers() -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder, max_batch=100, linger=LONG)
    await _under_load(coalescer)
    waiting = asyncio.ensure_future(coalescer.submit(100))
    await asyncio.sleep(0.01)
    # The drain ends the linger: the batch finds nothing to take, and is not waited for.
    await asyncio.wait_for(coalescer.drain(LONG), BOUND)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, BOUND)
    assert recorder.batches == [list(range(8))]
