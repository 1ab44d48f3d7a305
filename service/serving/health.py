"""grpc.health.v1 that reflects reality: a background probe pings the database and publishes
SERVING or NOT_SERVING for "" and each shop.v1 service; shutdown makes it NOT_SERVING for good.

Check and Watch read the stored status, so a load balancer polling Check costs no query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.context import Context
from service.db.ping import database_answers

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthService(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Check and Watch over a status per service name.

    Written here rather than taken from grpc_health's aio HealthServicer because that Watch
    writes with context.write (which the error interceptor's generator wrapping cannot pass
    through) and never ends: after shutdown is announced, our Watch sends NOT_SERVING and
    finishes, so watchers do not hold the server for the whole grace period.
    """

    def __init__(self, services: Iterable[str]) -> None:
        # Until the first probe answers nobody should route traffic here.
        self._status: dict[str, Any] = dict.fromkeys(services, NOT_SERVING)
        self._changed = asyncio.Event()
        self._closing = False

    def status(self, service: str = "") -> Any:
        return self._status.get(service, SERVICE_UNKNOWN)

    async def set_all(self, status: Any) -> None:
        """Publish one status for every service; ignored once shutdown has begun."""
        if not self._closing:
            self._publish(status)

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for good: later probe results are ignored, Watch streams end."""
        self._closing = True
        self._publish(NOT_SERVING)

    def _publish(self, status: Any) -> None:
        changed = any(current != status for current in self._status.values())
        for service in self._status:
            self._status[service] = status
        if changed or self._closing:
            # Wake every watcher once, then give the next change a fresh event.
            self._changed.set()
            self._changed = asyncio.Event()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        """The stored status of request.service; NOT_FOUND for a name we do not serve."""
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, _context: Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The current status, then every change; ends after shutdown's NOT_SERVING."""
        last = None
        while True:
            changed = self._changed  # taken before reading, so no change slips between
            status = self.status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
                # Read again: shutdown may have begun while that message was on its way, and
                # the watcher must see its NOT_SERVING before the stream ends.
                continue
            if self._closing:
                return
            await changed.wait()


class HealthProbe:
    """Every `interval` seconds: SELECT 1 with a deadline of `timeout`; publish the result."""

    def __init__(
        self, health: HealthService, engine: AsyncEngine, interval: float, timeout: float
    ) -> None:
        self.health = health
        self.engine = engine  # the probe's own, so a busy serving pool cannot fail the probe
        self.interval = interval
        self.timeout = timeout
        self.healthy: bool | None = None
        self._task: asyncio.Task[None] | None = None

    async def database_answers(self) -> bool:
        try:
            await database_answers(self.engine, self.timeout)
        except Exception as exc:  # any failure means "not answering"; the reason is logged
            if self.healthy is not False:
                log.warning("database not answering (%s): health NOT_SERVING", type(exc).__name__)
            return False
        return True

    async def probe_once(self) -> bool:
        healthy = await self.database_answers()
        if healthy and self.healthy is False:
            log.info("database answers again: health SERVING")
        self.healthy = healthy
        await self.health.set_all(SERVING if healthy else NOT_SERVING)
        return healthy

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="health-probe")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.probe_once()

    async def stop(self) -> None:
        """Stop probing and close the probe's connections."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.engine.dispose()
