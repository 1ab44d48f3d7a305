"""Health Watch at shutdown (service/serving/health.py), step by step on the service object:
whatever turn of the event loop the shutdown lands on, a watcher's last message before the
stream ends is NOT_SERVING. (CI once saw a Watch end with SERVING as its last word: the
shutdown came while SERVING was being sent, and the loop checked "closing" before reading the
status again.)"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health_pb2

from service.serving.health import HealthService

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_shutdown_while_serving_is_sent_still_ends_with_not_serving() -> None:
    health = HealthService([""])
    await health.set_all(SERVING)
    watch = health.Watch(health_pb2.HealthCheckRequest(), None)  # type: ignore[arg-type]
    assert (await anext(watch)).status == SERVING
    # The generator is paused at its yield: grpc is still sending SERVING.
    await health.enter_graceful_shutdown()
    rest = [reply.status async for reply in watch]
    assert rest == [NOT_SERVING]


async def test_shutdown_while_waiting_ends_with_not_serving() -> None:
    health = HealthService([""])
    await health.set_all(SERVING)
    watch = health.Watch(health_pb2.HealthCheckRequest(), None)  # type: ignore[arg-type]
    assert (await anext(watch)).status == SERVING
    waiting: Any = anext(watch)  # parked on the change event
    task = asyncio.ensure_future(waiting)
    await asyncio.sleep(0)
    await health.enter_graceful_shutdown()
    assert (await task).status == NOT_SERVING
    assert [reply.status async for reply in watch] == []
