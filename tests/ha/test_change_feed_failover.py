"""A WatchChanges token taken before a Patroni failover resumes exactly after it (issue 21,
guarantee 5). A watcher of users follows writes made through a real `serve` process on the
cluster's multi-host URL; T is the token of a response in the middle of what it received. The
primary's postmaster is SIGKILLed as in test_failover.py, Patroni promotes the synchronous
standby, more writes go through the same process (its pool reconnects to the new primary), and a
stream resumed from T on that process must deliver exactly the changes after T: every committed
(id, version) once, none twice, every acknowledged write among them, sequences continuing from
T's, versions consecutive per user.

No timed assertion: every wait is a bound that only tells a hang from a slow machine."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from shop.v1 import change_feed_service_pb2 as cf
from shop.v1 import change_feed_service_pb2_grpc as cf_grpc
from shop.v1 import resources_pb2 as pb
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy import text

from deploy.patroni.cluster import Cluster
from service.db.engine import create_unpooled_engine
from tests.changes.helpers import Watcher, change_id, first_response
from tests.ha.test_failover import RECOVERY_BOUND, promoted
from tests.process import Served

USER = cf.RESOURCE_TYPE_USER
CAUGHT_UP = cf.CHANGE_FEED_EVENT_CAUGHT_UP
CALL_DEADLINE = 5.0  # each attempt; one that hangs ends DEADLINE_EXCEEDED and is retried
RETRY_PAUSE = 0.2
GIVE_UP = 60.0  # a write still failing this long after its first attempt fails the test
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class Writer:
    """Writes users through the service; each create or update carries a unique label in
    last_name, and `acknowledged` holds the labels of the writes that returned OK."""

    def __init__(self, stub: user_service_pb2_grpc.UserServiceStub) -> None:
        self.stub = stub
        self.acknowledged: list[str] = []
        self._labels = 0

    def label(self) -> str:
        self._labels += 1
        return f"w{self._labels}"

    async def retried(self, call: Callable[[], Any]) -> Any:
        """`call` until it answers other than UNAVAILABLE or a passed deadline (a failover in
        progress). None when a retry finds ALREADY_EXISTS: an earlier attempt committed
        without an answer, so the write is committed but not acknowledged."""
        first, attempts = time.monotonic(), 0
        while True:
            attempts += 1
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.ALREADY_EXISTS and attempts > 1:
                    return None
                if error.code() not in RETRIED or time.monotonic() - first > GIVE_UP:
                    raise
            await asyncio.sleep(RETRY_PAUSE)

    async def create(self, email: str) -> int | None:
        label = self.label()
        request = api.CreateUserRequest(email=email, first_name="F", last_name=label)
        user = await self.retried(lambda: self.stub.CreateUser(request, timeout=CALL_DEADLINE))
        if user is None:
            return None
        self.acknowledged.append(label)
        return int(user.id)

    async def update(self, user_id: int) -> None:
        label = self.label()
        request = api.UpdateUserRequest(
            user=pb.User(id=user_id, last_name=label), update_mask=FieldMask(paths=["last_name"])
        )
        await self.retried(lambda: self.stub.UpdateUser(request, timeout=CALL_DEADLINE))
        self.acknowledged.append(label)

    async def delete(self, user_id: int) -> None:
        request = api.DeleteUserRequest(id=user_id)
        await self.retried(lambda: self.stub.DeleteUser(request, timeout=CALL_DEADLINE))


def key(change: cf.Change) -> tuple[int, int, int]:
    return (change.resource_type, change_id(change), change.version)


async def committed_versions(cluster: Cluster) -> dict[int, int]:
    """Every user's version, read on the new primary itself."""
    leader = cluster.leader()
    assert leader is not None
    engine = create_unpooled_engine(cluster.node_url(leader))
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT NOT pg_is_in_recovery()"))
            rows = (await conn.execute(text("SELECT id, version FROM users"))).all()
    finally:
        await engine.dispose()
    return {int(user_id): int(version) for user_id, version in rows}


async def test_a_token_resumes_exactly_after_a_patroni_failover(
    patroni: Cluster, ha_served: Served
) -> None:
    old_leader, _standby = patroni.wait_ready()
    feed = cf_grpc.ChangeFeedServiceStub(ha_served.channel)
    writer = Writer(user_service_pb2_grpc.UserServiceStub(ha_served.channel))

    # Before the failover: a watcher (one change per response, so every change has its own
    # token) sees 4 creates and 4 updates; T is the token right after the 4th change.
    watcher = Watcher(feed, cf.WatchChangesRequest(resource_types=[USER], max_batch_size=1))
    try:
        await watcher.until(lambda w: w.responses, "the first response")
        ids = [await writer.create(f"before{n}@example.com") for n in range(4)]
        assert None not in ids  # no failover yet: nothing is retried
        users = [i for i in ids if i is not None]
        for user_id in (users[0], users[1], users[0], users[3]):
            await writer.update(user_id)
        before = await watcher.changes_at_least(8)
    finally:
        await watcher.close()
    assert len(before) == 8
    token_response = next(r for r in watcher.responses if r.changes and r.changes[0] == before[3])
    token, t_sequence = token_response.resume_token, before[3].sequence
    seen_at_t = before[:4]
    # What resuming from T must bring back although it was committed on the old primary.
    expected_from_old_primary = [key(c) for c in before[4:]]

    pid = old_leader.postmaster_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await promoted(patroni, old_leader, RECOVERY_BOUND + 10)

    # After: the first write is retried until the process serves on the new primary (an
    # update: a retry after a commit whose answer was lost is one more committed version).
    await writer.update(users[1])
    new_id = await writer.create("after0@example.com")
    for user_id in (users[2], users[0], users[3]):
        await writer.update(user_id)
    if new_id is not None:
        await writer.update(new_id)
    await writer.delete(users[2])

    committed = await committed_versions(patroni)
    versions_at_t: dict[int, int] = {}
    for change in seen_at_t:
        versions_at_t[change_id(change)] = change.version
    expected = {
        (USER, user_id, version)
        for user_id, newest in committed.items()
        for version in range(versions_at_t.get(user_id, 0) + 1, newest + 1)
    }

    resumed = Watcher(feed, cf.WatchChangesRequest(resource_types=[USER], resume_token=token))
    try:
        # All writes were acknowledged before the resume: its first CAUGHT_UP has them all.
        # Then one marker write: whatever arrives before it came from the resume itself.
        await resumed.until(lambda w: any(r.event == CAUGHT_UP for r in w.responses), "CAUGHT_UP")
        await writer.update(users[3])
        marker = writer.acknowledged[-1]
        await resumed.until(lambda w: any(c.user.last_name == marker for c in w.changes), marker)
        changes = resumed.changes
    finally:
        await resumed.close()
    assert changes[-1].user.last_name == marker
    after_t = changes[:-1]
    keys = [key(c) for c in after_t]

    assert len(keys) == len(set(keys)), f"delivered twice: {sorted(keys)}"
    again = sorted(set(keys) & {key(c) for c in seen_at_t})
    assert again == [], f"received up to T and again after it: {again}"
    assert set(keys) == expected, (
        f"missing {sorted(expected - set(keys))}, not committed {sorted(set(keys) - expected)}"
    )
    assert keys[: len(expected_from_old_primary)] == expected_from_old_primary
    first = t_sequence + 1
    assert [c.sequence for c in changes] == list(range(first, first + len(changes)))
    # Per user: consecutive versions in order, right after the version seen at T.
    for user_id in committed:
        versions = [c.version for c in after_t if change_id(c) == user_id]
        start = versions_at_t.get(user_id, 0) + 1
        assert versions == list(range(start, start + len(versions))), (user_id, versions)
    # Every acknowledged write is in what the watcher got up to T or in the resume after it
    # (its label is the user's last_name from that change on).
    labels = {c.user.last_name for c in [*seen_at_t, *changes]}
    assert set(writer.acknowledged) <= labels, set(writer.acknowledged) - labels
    print(
        f"\nchange feed across a failover: {len(before)} changes before the kill (T after "
        f"{len(seen_at_t)}), {len(after_t)} resumed from T, sequences {t_sequence + 1}.."
        f"{changes[-1].sequence}, {len(writer.acknowledged)} acknowledged writes"
    )


REUSED = 20  # transactions the old primary begins and rolls back unseen by the standby (more
# than the new primary could use itself before the test's writes)


async def test_a_token_that_saw_an_xid_the_new_primary_reuses_misses_none_of_its_changes(
    patroni: Cluster, ha_served: Served
) -> None:
    """The hole a snapshot position leaves across a failover: the old primary gives REUSED
    transactions xids and rolls them back while its WAL sender is stopped, so the standby never
    learns of those xids; a token taken then counts them as finished. Patroni promotes the
    standby, which hands the same xids out again to the next writes. A stream resumed from the
    token must still deliver those writes' changes (they were written after the token's
    snapshot was taken, and the feed reads them by that)."""
    old_leader, _standby = patroni.wait_ready()
    feed = cf_grpc.ChangeFeedServiceStub(ha_served.channel)
    writer = Writer(user_service_pb2_grpc.UserServiceStub(ha_served.channel))
    first_user = await writer.create("first@example.com")
    assert first_user is not None

    old = create_unpooled_engine(patroni.node_url(old_leader))
    sender = None
    try:
        async with old.connect() as conn:
            sender = await conn.scalar(text("SELECT pid FROM pg_stat_replication"))
            await conn.rollback()
            assert sender is not None, "no WAL sender on the old primary"
            os.kill(sender, signal.SIGSTOP)
            lost = []
            for _ in range(REUSED):
                lost.append(int(await conn.scalar(text("SELECT pg_current_xact_id()::text"))))
                await conn.rollback()
            # The token: the first response of a stream started now, from the old primary.
            start = await first_response(feed, resource_types=[USER])
            assert start.event == CAUGHT_UP
            xmax = await conn.scalar(text("SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))
            await conn.rollback()
            assert int(xmax) > max(lost)
            pid = old_leader.postmaster_pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            os.kill(sender, signal.SIGKILL)
            sender = None
    finally:
        if sender is not None:  # the test failed before the kill: let the cluster go on
            os.kill(sender, signal.SIGCONT)
        await asyncio.gather(old.dispose(), return_exceptions=True)
    await promoted(patroni, old_leader, RECOVERY_BOUND + 10)

    # More writes than the xids lost, so the new primary's counter passes the token's xmax.
    created = [await writer.create(f"after{n}@example.com") for n in range(2 * REUSED)]
    await writer.update(first_user)

    leader = patroni.leader()
    assert leader is not None
    new = create_unpooled_engine(patroni.node_url(leader))
    try:
        async with new.connect() as conn:
            reused = await conn.scalar(
                text("SELECT count(*) FROM changes WHERE xid = ANY(CAST(:lost AS bigint[]))"),
                {"lost": lost},
            )
    finally:
        await new.dispose()
    assert reused, f"the new primary reused none of the lost xids {lost}: nothing was tested"

    committed = await committed_versions(patroni)
    expected = {
        (USER, user_id, version)
        for user_id, newest in committed.items()
        for version in range(2 if user_id == first_user else 1, newest + 1)
    }
    resumed = Watcher(
        feed, cf.WatchChangesRequest(resource_types=[USER], resume_token=start.resume_token)
    )
    try:
        await resumed.until(lambda w: any(r.event == CAUGHT_UP for r in w.responses), "CAUGHT_UP")
        await writer.update(first_user)
        marker = writer.acknowledged[-1]
        await resumed.until(lambda w: any(c.user.last_name == marker for c in w.changes), marker)
        changes = resumed.changes
    finally:
        await resumed.close()
    keys = [key(c) for c in changes[:-1]]
    assert len(keys) == len(set(keys)), f"delivered twice: {sorted(keys)}"
    assert set(keys) == expected, (
        f"missing {sorted(expected - set(keys))}, not committed {sorted(set(keys) - expected)}"
    )
    assert None not in created or len(created) == 2 * REUSED
    print(
        f"\nxids {lost} rolled back unseen by the standby, {reused} changes rows of the new "
        f"primary reuse them; {len(keys)} changes resumed from a token taken before, all there"
    )
