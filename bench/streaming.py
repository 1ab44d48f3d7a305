"""StreamUsers through gRPC: rows/s and time to first batch, read by a client in its own
process while this one samples the server's resident memory."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any

import grpc
from shop.v1 import user_service_pb2, user_service_pb2_grpc

from bench.processes import ServerProcess
from bench.results import Measurement

MB = 1024 * 1024


async def _read_stream(target: str, batch_size: int) -> tuple[int, float, float]:
    options = [("grpc.max_receive_message_length", 64 * MB)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await channel.channel_ready()
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        rows = 0
        first = 0.0
        started = time.perf_counter()
        async for batch in stub.StreamUsers(
            user_service_pb2.StreamUsersRequest(batch_size=batch_size)
        ):
            if not rows:
                first = time.perf_counter() - started
            rows += len(batch.users)
        return rows, first, time.perf_counter() - started


def _client_main(target: str, batch_size: int, out: Any) -> None:
    out.put(asyncio.run(_read_stream(target, batch_size)))


async def first_batch(target: str, batch_size: int) -> tuple[float, int]:
    """Seconds from sending StreamUsers to its first batch, and that batch's rows; the call is
    cancelled there (the rest is not read)."""
    options = [("grpc.max_receive_message_length", 64 * MB)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await channel.channel_ready()
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        started = time.perf_counter()
        call = stub.StreamUsers(user_service_pb2.StreamUsersRequest(batch_size=batch_size))
        batch = await call.read()
        elapsed = time.perf_counter() - started
        call.cancel()
        rows = 0 if batch is grpc.aio.EOF else len(batch.users)
        return elapsed, rows


async def stream_users(server: ServerProcess, batch_size: int) -> tuple[Measurement, float, float]:
    """The stream's rows/s, the server's peak RSS growth in MB while it ran, and the seconds to
    its first batch."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    client = ctx.Process(target=_client_main, args=(server.target, batch_size, out), daemon=True)
    before = peak = server.rss()
    cpu_before = server.cpu_seconds()
    client.start()
    while client.is_alive() and out.empty():
        peak = max(peak, server.rss())
        await asyncio.sleep(0.02)
    rows, first, elapsed = await asyncio.to_thread(out.get, True, 600)
    await asyncio.to_thread(client.join)
    growth = (peak - before) / MB
    cpu_us = (server.cpu_seconds() - cpu_before) * 1e6 / max(rows, 1)
    measurement = Measurement(
        "StreamUsers",
        rows / elapsed,
        "rows/s",
        details=(
            f"{rows:,} rows in {elapsed:.2f} s, batch_size {batch_size}, "
            f"first batch after {first * 1000:.1f} ms, server RSS +{growth:.1f} MB, "
            f"server CPU {cpu_us:.2f} µs per row"
        ),
    )
    return measurement, growth, first
