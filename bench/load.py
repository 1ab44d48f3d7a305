"""The load generator: several client processes (spawned, each with its own event loop and
grpc.aio channel) keep a fixed number of requests in flight for a fixed time.

Each process warms up, then counts the calls that complete inside the measured window and
records their latencies; the parent sums the counts and merges the latencies.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.results import Measurement, percentile
from bench.workloads import WORKLOADS, ItemErrors, Params


@dataclass(frozen=True)
class LoadSpec:
    """What to send, where, how many at a time, for how long."""

    target: str
    workload: str
    in_flight: int
    duration: float
    warmup: float
    processes: int
    params: Params = field(default_factory=dict)


@dataclass
class _Share:
    count: int
    latencies: bytes
    errors: dict[str, int]


def _split(total: int, parts: int) -> list[int]:
    """`total` in-flight requests spread over at most `parts` processes, none empty."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def _drive(spec: LoadSpec, client: int, in_flight: int, start: Any) -> _Share:
    async with grpc.aio.insecure_channel(spec.target) as channel:
        await channel.channel_ready()
        call = WORKLOADS[spec.workload](channel, spec.params, client)
        # Every process starts its clock together, so the windows line up.
        await asyncio.to_thread(start.wait)
        begin = time.perf_counter() + spec.warmup
        end = begin + spec.duration
        latencies = array("d")
        errors: Counter[str] = Counter()

        async def worker() -> None:
            while (sent := time.perf_counter()) < end:
                try:
                    await call()
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    continue
                except ItemErrors as exc:
                    errors[exc.name] += 1
                    continue
                done = time.perf_counter()
                if begin <= done <= end:
                    latencies.append(done - sent)

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return _Share(len(latencies), latencies.tobytes(), dict(errors))


def _client_main(spec: LoadSpec, client: int, in_flight: int, start: Any, out: Any) -> None:
    out.put(asyncio.run(_drive(spec, client, in_flight, start)))


def _collect(out: Any, procs: list[Any], deadline: float) -> list[_Share]:
    """Every client's share; fails fast when a client dies instead of waiting for it."""
    results: list[_Share] = []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for proc in procs:
                    proc.kill()
                raise RuntimeError(f"load client failed (exit codes {dead})") from None
    for proc in procs:
        proc.join()
    return results


def run_load(spec: LoadSpec, name: str | None = None) -> Measurement:
    """Blocking: runs the spec's client processes to the end and returns req/s and latency."""
    ctx = mp.get_context("spawn")  # grpc does not survive fork; spawned clients start clean
    shares = _split(spec.in_flight, spec.processes)
    start = ctx.Barrier(len(shares))
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_client_main, args=(spec, i, n, start, out), daemon=True)
        for i, n in enumerate(shares)
    ]
    for proc in procs:
        proc.start()
    results = _collect(out, procs, deadline=time.monotonic() + spec.warmup + spec.duration + 120)
    latencies = array("d")
    errors: Counter[str] = Counter()
    for share in results:
        latencies.frombytes(share.latencies)
        errors.update(share.errors)
    ordered = sorted(latencies)
    return Measurement(
        name=name or spec.workload,
        value=len(ordered) / spec.duration,
        unit="req/s",
        in_flight=spec.in_flight,
        p50_ms=percentile(ordered, 0.50) * 1000,
        p99_ms=percentile(ordered, 0.99) * 1000,
        errors=sum(errors.values()),
        details=", ".join(f"{code} x{n}" for code, n in errors.most_common()),
    )
