"""The NATS JetStream relay (SHOP_CHANGES_NATS_URL, docs/change-feed.md): one process of the
cluster publishes every change of the feed (service/app/changes.py), in order, to a JetStream
stream, each as the serialized shop.v1 Change that WatchChanges sends.

Exactly once, in order, whatever kills the relay, because the stream itself is the relay's
position: every message carries, besides its sequence as Nats-Msg-Id, the feed's position right
after it (Shop-Resume-Token). The feed is watched one change per batch, so each change has such
an exact position. A relay that starts reads the stream's last message and resumes from its
token; the changes after it come out again identical, with the same sequences. Every publish
names the stream sequence it expects to follow (Nats-Expected-Last-Sequence), so a publisher
that lost the lock without knowing it (its database connection cut, not yet noticed) is
refused by JetStream instead of interleaving with the new one; the relay then starts over.
The same guard lets up to WINDOW publishes be in flight at once: one refused or lost, and every
later one is refused too.

Who publishes: the holder of a session advisory lock per stream (service/db/leader.py); the
others try again every RETRY_SECONDS and take over when the holder's connection closes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from service.api.changes_convert import change_to_proto
from service.app.changes import ChangeFeed, Event, FeedBatch, Position, ResourceType
from service.config import Settings
from service.db.database import Database
from service.db.leader import ClusterLock
from service.db.schema_state import SchemaFeatures

if TYPE_CHECKING:
    from nats.js import JetStreamContext

log = logging.getLogger(__name__)

SUBJECTS = "shop.changes.>"
RESUME_HEADER = "Shop-Resume-Token"
SUBJECT_NAMES = {
    ResourceType.USER: "user",
    ResourceType.ORDER: "order",
    ResourceType.ACCOUNT: "account",
    ResourceType.TRANSFER: "transfer",
}
# Between two tries of the lock, and before starting over after a failure; also how often the
# holder checks that its lock's connection still answers.
RETRY_SECONDS = 2.0
# A publish's acknowledgement, a stream lookup, a lock statement: longer means NATS or the
# database is not answering, and the relay starts over.
TIMEOUT_SECONDS = 5.0
# Publishes in flight at once. Each names the stream sequence it must follow, so JetStream
# stores them in order or refuses the rest (the relay then starts over from the stream's last
# message). Awaiting each ack before the next publish capped the relay at ~160 changes/s while
# 1,000/s were written (`make bench`, the relay's point: p50 5.7 s behind the commits).
WINDOW = 256


@dataclass(frozen=True, slots=True)
class _Sent:
    """A publish in flight: its ack, the change's sequence, the stream sequence it must take."""

    ack: asyncio.Future[Any]
    sequence: int
    stream_sequence: int


class RelayConflict(Exception):
    """The stream is not where this relay left it: another publisher, or not our stream."""


def subject(batch: FeedBatch) -> str:
    change = batch.changes[0]
    return f"shop.changes.{SUBJECT_NAMES[change.resource_type]}.{change.row['id']}"


def resume_token(position: Position) -> str:
    """A position as a header value (compact JSON: no CR or LF, as NATS headers need)."""
    return json.dumps(position.to_fields(), separators=(",", ":"))


def position_of(headers: dict[str, str] | None) -> Position:
    token = (headers or {}).get(RESUME_HEADER)
    if token is None:
        raise RelayConflict(f"the stream's last message has no {RESUME_HEADER} header")
    return Position.from_fields(json.loads(token))


class ChangeRelay:
    """Publishes the change feed to a JetStream stream while this process holds the lock."""

    def __init__(
        self, feed: ChangeFeed, lock: ClusterLock, url: str, stream: str, retry: float
    ) -> None:
        self._feed = feed
        self._lock = lock
        self._url = url
        self.stream = stream
        self._retry = retry
        self._task: asyncio.Task[None] | None = None
        self.leader = False
        self.sequence = 0  # of the last change published
        self._behind: datetime | None = None  # commit time of the change being published

    def lag_seconds(self) -> float:
        """Seconds since the commit of the change being published; 0 once caught up."""
        behind = self._behind
        return 0.0 if behind is None else max(0.0, (datetime.now(UTC) - behind).total_seconds())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="change relay")

    async def stop(self) -> None:
        """Stop publishing and let the lock go (another process takes over)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._lock.dispose()

    async def _run(self) -> None:
        while True:
            try:
                await self._lock.acquire(self._retry)
                self.leader = True
                await self._lead()
            except Exception as exc:
                log.warning(
                    "change relay stopped (%s: %s); starting over in %.0fs",
                    type(exc).__name__,
                    exc,
                    self._retry,
                )
            finally:
                self.leader = False
                self._behind = None
                await self._lock.release()
            await asyncio.sleep(self._retry)

    async def _lead(self) -> None:
        """Publish until something fails: the lock's connection, NATS, the stream."""
        import nats

        async def report(exc: Exception) -> None:
            log.info("NATS: %s", exc)

        client = await nats.connect(
            self._url,
            name="shop-service change relay",
            allow_reconnect=False,  # a reconnect may have lost publishes: start over instead
            connect_timeout=TIMEOUT_SECONDS,
            error_cb=report,
        )
        try:
            js = client.jetstream(timeout=TIMEOUT_SECONDS)
            start, last = await self._resume(js)
            log.info(
                "relaying changes to JetStream stream %s from sequence %d",
                self.stream,
                start.sequence,
            )
            tasks = [
                asyncio.ensure_future(self._publish(js, start, last)),
                asyncio.ensure_future(self._hold()),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            with contextlib.suppress(Exception):  # a NATS gone silent: nothing left to flush
                async with asyncio.timeout(TIMEOUT_SECONDS):
                    await client.close()

    async def _hold(self) -> None:
        """Return (raise) when the lock's connection stops answering."""
        while True:
            await asyncio.sleep(self._retry)
            await self._lock.check()

    async def _resume(self, js: JetStreamContext) -> tuple[Position, int]:
        """(where the feed resumes, the stream's last sequence), the stream created if missing."""
        from nats.js.errors import NotFoundError

        try:
            info = await js.stream_info(self.stream)
        except NotFoundError:
            info = await js.add_stream(name=self.stream, subjects=[SUBJECTS])
            log.info("created JetStream stream %s on %s", self.stream, SUBJECTS)
        state = info.state
        if not state.messages:  # from the oldest change the log still holds
            return await self._feed.oldest(), state.last_seq
        message = await js.get_msg(self.stream, state.last_seq)
        return position_of(message.headers), state.last_seq

    async def _publish(self, js: JetStreamContext, start: Position, last: int) -> None:
        self.sequence = start.sequence
        pending: deque[_Sent] = deque()
        # One change per batch: each message gets the exact position right after it.
        batches = self._feed.watch(start, tuple(ResourceType), 1)
        try:
            async with aclosing(batches):
                async for batch in batches:
                    if batch.changes:
                        pending.append(self._send(js, batch, last))
                        last += 1
                        if len(pending) >= WINDOW:
                            await self._settle(pending.popleft())
                    if batch.event is not Event.NONE:  # caught up, or a heartbeat: settle all
                        while pending:
                            await self._settle(pending.popleft())
                    if batch.event is Event.CAUGHT_UP:
                        self._behind = None
        finally:
            for sent in pending:
                sent.ack.cancel()
            await asyncio.gather(*(sent.ack for sent in pending), return_exceptions=True)

    def _send(self, js: JetStreamContext, batch: FeedBatch, last: int) -> _Sent:
        """Publish one change after stream sequence `last`, without waiting for its ack."""
        change, sequence = batch.changes[0], batch.position.sequence
        self._behind = change.time
        headers = {
            "Nats-Msg-Id": str(sequence),
            "Nats-Expected-Last-Sequence": str(last),
            RESUME_HEADER: resume_token(batch.position),
        }
        payload = change_to_proto(change, sequence).SerializeToString()
        ack = asyncio.ensure_future(
            js.publish(subject(batch), payload, stream=self.stream, headers=headers)
        )
        return _Sent(ack, sequence, last + 1)

    async def _settle(self, sent: _Sent) -> None:
        """Wait for a publish's ack: stored as the stream sequence it was meant to take."""
        ack: Any = await sent.ack
        if ack.duplicate or ack.seq != sent.stream_sequence:
            raise RelayConflict(
                f"stream {self.stream} stored #{sent.sequence} as {ack.seq}, "
                f"not {sent.stream_sequence}"
            )
        self.sequence = sent.sequence


def relay_from_settings(
    settings: Settings, database_url: str, db: Database, features: SchemaFeatures
) -> ChangeRelay | None:
    """The relay (not started yet) when SHOP_CHANGES_NATS_URL is set, else None."""
    url = settings.nats_url()
    if url is None:
        return None
    if not features.change_log:
        log.warning("SHOP_CHANGES_NATS_URL is set, but the schema has no change log: no relay")
        return None
    try:
        import nats  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "SHOP_CHANGES_NATS_URL is set but nats-py is not installed: "
            "pip install 'shop-service[nats]'"
        ) from None
    # A feed of its own, reading the primary: the servicer's polls follow whichever route the
    # call that started them had.
    feed = ChangeFeed(
        db,
        poll_interval=settings.changes_poll_interval,
        heartbeat=settings.changes_heartbeat,
        readers=1,
    )
    stream = settings.changes_nats_stream
    lock = ClusterLock(database_url, f"changes relay {stream}", TIMEOUT_SECONDS)
    return ChangeRelay(feed, lock, url, stream, RETRY_SECONDS)
