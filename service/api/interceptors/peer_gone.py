"""Sends to a call whose client may be gone (cancelled, past its deadline, disconnected): such a
call ends as the cancellation it is, never as grpc's error for a failed send."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import grpc

# How long a failed send waits for grpc's cancellation of its call. grpc learns that a call is
# over from two completions, the failed send and the call's close, in either order; when the
# send's comes first, grpc logs "ExecuteBatchError raised in core" at ERROR with a traceback, as
# if the server had failed. The close follows within a loop turn (measured: 0.07-0.3 ms on
# loopback, streams cancelled mid-write); only a send that failed with the call still open
# (a real fault) waits this long before its error goes up.
CLOSE_NOTICE_SECONDS = 1.0


async def sent(send: Awaitable[None]) -> None:
    """Await one of the context's sends (write, send_initial_metadata). If grpc fails it, wait
    for grpc to cancel this task (the client is gone: grpc logs that at DEBUG, the access line
    says CANCELLED) and raise grpc's error only if no cancellation comes."""
    try:
        await send
    except grpc.aio.InternalError:  # ExecuteBatchError: the batch holding the send failed
        await asyncio.sleep(CLOSE_NOTICE_SECONDS)
        raise
