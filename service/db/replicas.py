"""Read replicas (SHOP_DATABASE_REPLICA_URLS): a pool per streaming standby, a background check
of each one's replay lag, and the choice of a usable one for a read that routing.py sends there.

A replica is usable when its last check answered within SHOP_HEALTH_TIMEOUT, it is a standby
that is receiving WAL, and its lag is at most SHOP_REPLICA_MAX_LAG. Checks run every
SHOP_REPLICA_CHECK_INTERVAL on a connection of their own, never on a caller's time; a call
that finds its replica broken marks it unusable until the next check says otherwise. With no
replica usable, reads go to the primary. Health follows the primary only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.config import Settings
from service.db.closing import dispose_within
from service.db.engine import create_probe_engine, create_replica_engine, create_sessionmaker

log = logging.getLogger(__name__)

# The lag, measured on the replica alone (no query on the primary, so a slow primary cannot
# slow the check, and nothing depends on the two servers' clocks agreeing while caught up).
# Streaming replication receives WAL as the primary flushes it, so what a standby lacks is, in
# practice, what it received and has not replayed yet:
# - replay LSN >= receive LSN: nothing received is waiting: lag 0.
# - otherwise the lag is at most either of two bounds, and we take the smaller:
#   * now() - pg_last_xact_replay_timestamp(), the age of the newest commit replayed: every
#     commit missing is newer. Alone it is no good: after an idle spell (nothing to replay,
#     that commit hours old) the first write makes a replica look hours behind for a moment.
#   * the time since the latest check whose receive LSN replay has since passed: everything
#     the standby had received by then is applied. (ReplayClock keeps those samples.)
#   So a replica that is busy replaying stays usable, and one whose replay stopped (paused, or
#   waiting out a recovery conflict) is skipped once both bounds pass SHOP_REPLICA_MAX_LAG.
# - no WAL receiver: the standby lost its primary (or its walsender) and cannot know what it
#   lacks: unusable. Nor is a server not in recovery (a promoted standby no longer follows
#   our primary; after a failover the primary URL finds it).
LAG_QUERY = text(
    "SELECT pg_is_in_recovery() AS standby,"
    " (SELECT pid FROM pg_stat_wal_receiver) IS NOT NULL AS receiving,"
    " pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')::int8 AS received,"
    " pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::int8 AS replayed,"
    " EXTRACT(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS replay_age"
)
# Checks remembered while replay is behind; past that, the oldest go (the bound only grows).
SAMPLES = 1000


class ReplayClock:
    """One replica's lag from its successive checks (the rule above LAG_QUERY)."""

    def __init__(self) -> None:
        self._received: deque[tuple[float, int]] = deque(maxlen=SAMPLES)
        self._applied_at: float | None = None  # all received by then is replayed

    def lag(
        self, now: float, received: int | None, replayed: int | None, replay_age: float | None
    ) -> float:
        """Seconds behind, at most (inf: unknown), from one check's row."""
        if received is not None and replayed is not None and replayed >= received:
            self._received.clear()
            self._applied_at = now
            return 0.0
        while self._received and replayed is not None and self._received[0][1] <= replayed:
            self._applied_at = self._received.popleft()[0]
        if received is not None:
            self._received.append((now, received))
        bounds = [b for b in (replay_age,) if b is not None]
        if self._applied_at is not None:
            bounds.append(now - self._applied_at)
        return max(0.0, min(bounds)) if bounds else math.inf


@dataclass(eq=False)
class Replica:
    """One standby: the pool reads use, and the probe engine its checks use."""

    name: str  # host:port/database, no password: for logs
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    probe: AsyncEngine
    usable: bool = False
    lag: float = math.inf
    clock: ReplayClock = field(default_factory=ReplayClock)


def display_name(url: str) -> str:
    parsed = make_url(url)
    return f"{parsed.host or parsed.query.get('host', '')}:{parsed.port or ''}/{parsed.database}"


class Replicas:
    """The replicas, their checks, and the choice of one (round robin among the usable)."""

    def __init__(
        self, replicas: Sequence[Replica], max_lag: float, interval: float, timeout: float
    ) -> None:
        self.replicas = list(replicas)
        self.max_lag = max_lag
        self.interval = interval
        self.timeout = timeout
        self._turn = itertools.count()
        self._task: asyncio.Task[None] | None = None

    def pick(self) -> Replica | None:
        """A usable replica, or None: read the primary."""
        usable = [r for r in self.replicas if r.usable]
        if not usable:
            return None
        return usable[next(self._turn) % len(usable)]

    def mark_down(self, replica: Replica, exc: BaseException) -> None:
        """A call found the replica broken: skip it until a check finds it well again."""
        if replica.usable:
            log.warning(
                "replica %s failed a call (%s): reads skip it until it answers a check",
                replica.name,
                type(exc).__name__,
            )
        replica.usable = False

    async def check(self, replica: Replica) -> None:
        try:
            # asyncpg's connect and command timeouts come first; this is the backstop.
            async with asyncio.timeout(self.timeout * 2), replica.probe.connect() as conn:
                row = (await conn.execute(LAG_QUERY)).one()
            if row.standby and row.receiving:
                now = asyncio.get_running_loop().time()
                lag = replica.clock.lag(now, row.received, row.replayed, row.replay_age)
            else:
                lag = math.inf
            reason = f"{lag:.3f}s behind (max {self.max_lag}s)"
        except Exception as exc:  # any failure means "not usable"; the reason is logged
            lag, reason = math.inf, f"not answering ({type(exc).__name__})"
        usable = lag <= self.max_lag
        if usable != replica.usable:
            log.log(
                logging.INFO if usable else logging.WARNING,
                "replica %s %s: %s",
                replica.name,
                "usable" if usable else "skipped",
                reason,
            )
        replica.lag, replica.usable = lag, usable

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="replica-checks")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check_all()

    async def close(self, seconds: float) -> None:
        """Stop checking; close every replica's connections, within `seconds` each even if
        the replica went silent (service/db/closing.py)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for replica in self.replicas:
            await dispose_within(replica.engine, seconds)
            await replica.probe.dispose()


def open_replicas(settings: Settings, info: dict[str, Any] | None = None) -> Replicas | None:
    """An engine per SHOP_DATABASE_REPLICA_URLS entry (sessions carry `info`, as the primary's
    do); None when there are none. Nothing connects until the first check."""
    urls = settings.replica_urls()
    if not urls:
        return None
    replicas = [
        Replica(
            name=display_name(url),
            engine=(engine := create_replica_engine(settings, url)),
            sessions=create_sessionmaker(engine, info),
            probe=create_probe_engine(url, settings.health_timeout),
        )
        for url in urls
    ]
    return Replicas(
        replicas,
        max_lag=settings.replica_max_lag,
        interval=settings.replica_check_interval,
        timeout=settings.health_timeout,
    )
