"""WatchChanges under a bank-style load (issue 21): 16 writers over every write path, RPCs and
SQL, some rolled back, some holding row locks so that commits land out of start order, while a
watcher is cut and resumed from its last token; and a SNAPSHOT watcher started mid-load. What
the watchers received is checked against the tables at the end: every committed version once,
consecutive per resource, nothing rolled back, and a mirror built from the feed equals the
database. Real server, real channel, real PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import account_service_pb2_grpc, order_service_pb2_grpc, user_service_pb2_grpc
from shop.v1 import change_feed_service_pb2 as cf
from shop.v1 import change_feed_service_pb2_grpc as cf_grpc
from shop.v1 import order_service_pb2 as orders_api
from shop.v1 import resources_pb2 as pb
from shop.v1 import user_service_pb2 as users_api
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.errors import is_retryable
from tests.changes.helpers import WAIT, Watcher, change_id
from tests.ids import rid

WRITERS = 16
LOAD_SECONDS = float(os.environ.get("SHOP_FEED_LOAD_SECONDS", "10"))
OPS_PER_WRITER = 400  # a bound by count beside the one by time
RESUMES = 5  # at least this many cuts and resumes of the watcher
ROLLBACK_SHARE = 0.2  # of the SQL transactions
LOCK_HOLD = (0.2, 0.5)  # seconds a lock-holding SQL transaction sleeps between its updates
ROLLED_BACK = "rolledback-"  # email prefix (and last_name) only rolled-back writes use
SEED = int(os.environ.get("SHOP_FEED_LOAD_SEED", random.randrange(1 << 30)))
QUIESCENCE_WAIT = 60.0  # hang guard for a watcher to drain the whole load

USER, ORDER, ACCOUNT, TRANSFER = (
    cf.RESOURCE_TYPE_USER,
    cf.RESOURCE_TYPE_ORDER,
    cf.RESOURCE_TYPE_ACCOUNT,
    cf.RESOURCE_TYPE_TRANSFER,
)
TABLES = {USER: "users", ORDER: "orders", ACCOUNT: "accounts", TRANSFER: "transfers"}
# Expected failures of a write under load (a business rule, a lost race); the tables are the
# truth at the end, so these only roll back.
EXPECTED_CODES = {
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INVALID_ARGUMENT,  # an import naming a user soft-deleted meanwhile
}
NEXT_STATUS = {
    pb.ORDER_STATUS_PENDING: (pb.ORDER_STATUS_PAID, pb.ORDER_STATUS_CANCELLED),
    pb.ORDER_STATUS_PAID: (pb.ORDER_STATUS_SHIPPED, pb.ORDER_STATUS_CANCELLED),
    pb.ORDER_STATUS_SHIPPED: (pb.ORDER_STATUS_DELIVERED,),
}

Key = tuple[int, int]  # (resource_type, id)


# --- what the database holds ------------------------------------------------------------------


@dataclass
class State:
    """Versions and the compared fields of every row, from the tables or from a feed."""

    versions: dict[Key, int] = field(default_factory=dict)
    values: dict[Key, tuple[Any, ...]] = field(default_factory=dict)


async def read_state(engine: AsyncEngine) -> State:
    state = State()
    queries = {
        USER: "SELECT id, version, email, first_name, last_name, deleted_at FROM users",
        ORDER: "SELECT id, version, status FROM orders",
        ACCOUNT: "SELECT id, version, balance FROM accounts",
        TRANSFER: "SELECT id, 1, from_account_id, to_account_id, amount FROM transfers",
    }
    async with engine.connect() as conn, conn.begin():
        await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        for kind, query in queries.items():
            for row in await conn.execute(text(query)):
                key = (kind, int(row[0]))
                state.versions[key] = int(row[1])
                state.values[key] = tuple(row[2:])
    return state


def values_of(change: cf.Change) -> tuple[Any, ...]:
    """The compared fields of the resource a change carries, as read_state reads them."""
    kind = change.WhichOneof("resource")
    if kind == "user":
        u = change.user
        deleted = u.deleted_at.ToDatetime(tzinfo=UTC) if u.HasField("deleted_at") else None
        return (u.email, u.first_name, u.last_name, deleted)
    if kind == "order":
        return (pb.OrderStatus.Name(change.order.status).removeprefix("ORDER_STATUS_").lower(),)
    if kind == "account":
        return (Decimal(change.account.balance),)
    t = change.transfer
    return (t.from_account_id, t.to_account_id, Decimal(t.amount))


def normalized(state: State) -> dict[Key, tuple[Any, ...]]:
    """Values with timestamps compared as instants."""
    out = {}
    for key, value in state.values.items():
        out[key] = tuple(v.astimezone(UTC) if isinstance(v, datetime) else v for v in value)
    return out


# --- a watcher cut and resumed ----------------------------------------------------------------


class ResumedWatcher:
    """A WatchChanges stream cut at random moments and resumed from the last token received."""

    def __init__(self, stub: cf_grpc.ChangeFeedServiceStub, **request: Any) -> None:
        self.stub = stub
        self.max_batch_size = request.get("max_batch_size", 0)
        self.segments = [Watcher(stub, cf.WatchChangesRequest(**request))]
        self.resumes = 0

    @property
    def responses(self) -> list[cf.WatchChangesResponse]:
        return [r for w in self.segments for r in w.responses]

    @property
    def changes(self) -> list[cf.Change]:
        return [c for w in self.segments for c in w.changes]

    def token(self) -> str:
        for response in reversed(self.responses):
            if response.resume_token:
                return response.resume_token
        raise AssertionError("no token received yet")

    async def resume(self) -> None:
        await self.segments[-1].close()
        request = cf.WatchChangesRequest(
            resume_token=self.token(), max_batch_size=self.max_batch_size
        )
        self.segments.append(Watcher(self.stub, request))
        self.resumes += 1

    async def until(self, check: Any, what: str, wait: float = WAIT) -> None:
        await self.segments[-1].until(lambda _w: check(self), what, wait)

    async def close(self) -> None:
        await self.segments[-1].close()


# --- the writers ------------------------------------------------------------------------------


@dataclass
class Stubs:
    users: user_service_pb2_grpc.UserServiceStub
    orders: order_service_pb2_grpc.OrderServiceStub
    accounts: account_service_pb2_grpc.AccountServiceStub


@dataclass
class Load:
    """The writers' shared view of what exists, and how often each write path succeeded (an
    SQL path counts its rollbacks too) or failed."""

    stubs: Stubs
    engine: AsyncEngine
    rng: random.Random
    users: list[int] = field(default_factory=list)
    emails: list[str] = field(default_factory=list)
    orders: dict[int, int] = field(default_factory=dict)  # id -> status the last writer saw
    accounts: list[int] = field(default_factory=list)
    done: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    rolled_back: int = 0
    names: itertools.count[int] = field(default_factory=itertools.count)

    def email(self) -> str:
        return f"load{next(self.names)}@load.io"

    def amount(self) -> str:
        return f"{self.rng.randint(1, 500) / 100:.2f}"

    # RPC paths -----------------------------------------------------------------------------

    async def create_user(self) -> None:
        user = await self.stubs.users.CreateUser(
            users_api.CreateUserRequest(email=self.email(), first_name="C", last_name="U")
        )
        self.users.append(user.id)
        self.emails.append(user.email)

    async def update_user(self) -> None:
        path = self.rng.choice(["first_name", "last_name"])
        user = pb.User(id=self.rng.choice(self.users), **{path: f"u{next(self.names)}"})
        await self.stubs.users.UpdateUser(
            users_api.UpdateUserRequest(user=user, update_mask=FieldMask(paths=[path]))
        )

    async def delete_user(self) -> None:
        await self.stubs.users.DeleteUser(
            users_api.DeleteUserRequest(id=self.rng.choice(self.users))
        )

    async def undelete_user(self) -> None:
        await self.stubs.users.UndeleteUser(
            users_api.UndeleteUserRequest(id=self.rng.choice(self.users))
        )

    def _upserts(self, n: int) -> list[users_api.UpsertUser]:
        emails = {self.rng.choice(self.emails) for _ in range(n // 2)}
        emails |= {self.email() for _ in range(n - len(emails))}
        return [
            users_api.UpsertUser(email=e, first_name="Up", last_name=f"s{next(self.names)}")
            for e in sorted(emails)
        ]

    async def upsert_users(self) -> None:
        batch = self._upserts(4)
        await self.stubs.users.UpsertUsers(users_api.UpsertUsersRequest(users=batch))
        self.emails.extend(u.email for u in batch)

    async def import_users(self) -> None:
        batches = [
            self._upserts(3),
            [users_api.UpsertUser(email=self.email(), first_name="I", last_name="I")],
        ]

        async def requests() -> AsyncIterator[users_api.ImportUsersRequest]:
            for batch in batches:
                yield users_api.ImportUsersRequest(users=batch)

        await self.stubs.users.ImportUsers(requests())
        self.emails.extend(u.email for b in batches for u in b)

    async def create_order(self) -> None:
        items = [
            pb.OrderItem(sku=f"SKU-{self.rng.randint(1, 9)}", quantity=2, unit_price="3.50"),
            pb.OrderItem(sku="BOOK", quantity=1, unit_price="19.99"),
        ]
        order = await self.stubs.orders.CreateOrder(
            orders_api.CreateOrderRequest(
                user_id=self.rng.choice(self.users), items=items, request_id=rid()
            )
        )
        self.orders[order.id] = order.status

    async def update_order_status(self) -> None:
        open_orders = [i for i, s in self.orders.items() if s in NEXT_STATUS]
        if not open_orders:
            return await self.create_order()
        order_id = self.rng.choice(open_orders)
        target = self.rng.choice(NEXT_STATUS[self.orders[order_id]])
        order = await self.stubs.orders.UpdateOrderStatus(
            orders_api.UpdateOrderStatusRequest(id=order_id, status=target)
        )
        self.orders[order.id] = order.status
        return None

    async def open_account(self) -> None:
        account = await self.stubs.accounts.OpenAccount(
            accounts_api.OpenAccountRequest(
                user_id=self.rng.choice(self.users), currency="EUR", request_id=rid()
            )
        )
        self.accounts.append(account.id)

    async def deposit(self) -> None:
        await self.stubs.accounts.Deposit(
            accounts_api.DepositRequest(
                account_id=self.rng.choice(self.accounts), amount=self.amount(), request_id=rid()
            )
        )

    async def withdraw(self) -> None:
        await self.stubs.accounts.Withdraw(
            accounts_api.WithdrawRequest(
                account_id=self.rng.choice(self.accounts), amount=self.amount(), request_id=rid()
            )
        )

    def _transfer(self) -> accounts_api.TransferRequest:
        source, target = self.rng.sample(self.accounts, 2)
        return accounts_api.TransferRequest(
            from_account_id=source, to_account_id=target, amount=self.amount(), request_id=rid()
        )

    async def transfer(self) -> None:
        await self.stubs.accounts.Transfer(self._transfer())

    async def batch_transfer(self) -> None:
        requests = [self._transfer() for _ in range(3)]
        await self.stubs.accounts.BatchTransfer(
            accounts_api.BatchTransferRequest(requests=requests)
        )

    # SQL paths -----------------------------------------------------------------------------

    async def sql_write(self) -> None:
        """An operator's INSERT and UPDATE in one transaction; ~20% rolled back."""
        rollback = self.rng.random() < ROLLBACK_SHARE
        email = f"{ROLLED_BACK}{next(self.names)}@load.io" if rollback else self.email()
        last = f"{ROLLED_BACK}x" if rollback else f"sql{next(self.names)}"
        async with self.engine.connect() as conn:
            await conn.begin()
            await conn.execute(
                text("INSERT INTO users (email, first_name, last_name) VALUES (:e, 'S', 'Q')"),
                {"e": email},
            )
            await conn.execute(
                text("UPDATE users SET last_name = :l WHERE id = :id"),
                {"l": last, "id": self.rng.choice(self.users)},
            )
            if rollback:
                await conn.rollback()
                self.rolled_back += 1
                return
            await conn.commit()
        self.emails.append(email)

    async def sql_lock_holder(self) -> None:
        """UPDATE one user, hold its lock 200-500 ms, UPDATE another, COMMIT: a transaction
        that took its xid early and commits late (~20% rolled back). Ids in ascending order,
        so two of these never deadlock."""
        rollback = self.rng.random() < ROLLBACK_SHARE
        last = f"{ROLLED_BACK}x" if rollback else f"held{next(self.names)}"
        first, second = sorted(self.rng.sample(self.users, 2))
        async with self.engine.connect() as conn:
            await conn.begin()
            update = text("UPDATE users SET last_name = :l WHERE id = :id")
            await conn.execute(update, {"l": last, "id": first})
            await asyncio.sleep(self.rng.uniform(*LOCK_HOLD))
            await conn.execute(update, {"l": last, "id": second})
            if rollback:
                await conn.rollback()
                self.rolled_back += 1
                return
            await conn.commit()

    # the loop ------------------------------------------------------------------------------

    PATHS = {
        "CreateUser": (create_user, 3),
        "UpdateUser": (update_user, 4),
        "DeleteUser": (delete_user, 2),
        "UndeleteUser": (undelete_user, 2),
        "UpsertUsers": (upsert_users, 2),
        "ImportUsers": (import_users, 1),
        "CreateOrder": (create_order, 3),
        "UpdateOrderStatus": (update_order_status, 4),
        "OpenAccount": (open_account, 2),
        "Deposit": (deposit, 3),
        "Withdraw": (withdraw, 3),
        "Transfer": (transfer, 4),
        "BatchTransfer": (batch_transfer, 2),
        "sql": (sql_write, 3),
        "sql_lock_holder": (sql_lock_holder, 2),
    }

    async def writer(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        names = list(self.PATHS)
        weights = [self.PATHS[n][1] for n in names]
        for _ in range(OPS_PER_WRITER):
            if loop.time() >= deadline:
                return
            name = self.rng.choices(names, weights)[0]
            try:
                await self.PATHS[name][0](self)
            except grpc.aio.AioRpcError as error:
                if error.code() not in EXPECTED_CODES:
                    raise AssertionError(f"{name}: {error.code()} {error.details()}") from error
                self.failed[name] += 1
            except sa_exc.DBAPIError as error:  # SQL paths: a deadlock rolls one back
                if not is_retryable(error):
                    raise
                self.failed[name] += 1
            else:
                self.done[name] += 1

    async def run(self, seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        await asyncio.gather(*(self.writer(deadline) for _ in range(WRITERS)))


async def seeded_load(stubs: Stubs, engine: AsyncEngine, rng: random.Random) -> Load:
    """A few users, orders and funded accounts for the writers to start from."""
    load = Load(stubs, engine, rng)
    for _ in range(6):
        await load.create_user()
    for _ in range(4):
        await load.open_account()
        await load.deposit()
        await load.create_order()
    return load


@pytest.fixture
def stubs(
    user_stub: user_service_pb2_grpc.UserServiceStub,
    order_stub: order_service_pb2_grpc.OrderServiceStub,
    account_stub: account_service_pb2_grpc.AccountServiceStub,
) -> Stubs:
    return Stubs(user_stub, order_stub, account_stub)


@pytest.fixture(scope="session")
def feed_stub(channel: grpc.aio.Channel) -> cf_grpc.ChangeFeedServiceStub:
    return cf_grpc.ChangeFeedServiceStub(channel)


# --- checks -----------------------------------------------------------------------------------


def assert_sequences_increase(changes: list[cf.Change]) -> None:
    sequences = [c.sequence for c in changes]
    backwards = [(a, b) for a, b in itertools.pairwise(sequences) if b <= a]
    assert not backwards, f"sequence not strictly increasing at {backwards[:10]} (seed {SEED})"


def assert_versions_consecutive(changes: list[cf.Change]) -> dict[Key, list[int]]:
    arrived: dict[Key, list[int]] = defaultdict(list)
    for c in changes:
        arrived[(c.resource_type, change_id(c))].append(c.version)
    broken = {
        key: versions
        for key, versions in arrived.items()
        if versions != list(range(versions[0], versions[0] + len(versions)))
    }
    assert not broken, f"versions not consecutive in arrival order: {broken} (seed {SEED})"
    return arrived


def assert_nothing_rolled_back(changes: list[cf.Change]) -> None:
    leaked = [
        (c.user.id, c.version, c.user.email, c.user.last_name)
        for c in changes
        if c.HasField("user") and (ROLLED_BACK in c.user.email or ROLLED_BACK in c.user.last_name)
    ]
    assert not leaked, f"changes of rolled-back transactions were handed out: {leaked}"


def mirror(
    base: dict[Key, tuple[Any, ...]], changes: list[cf.Change]
) -> dict[Key, tuple[Any, ...]]:
    """`base` with each resource replaced by its received version of highest number."""
    out, latest = dict(base), {}
    for c in changes:
        key = (c.resource_type, change_id(c))
        if c.version >= latest.get(key, 0):
            latest[key] = c.version
            out[key] = values_of(c)
    return out


def assert_mirror_equals(got: dict[Key, tuple[Any, ...]], db: State) -> None:
    want = normalized(db)
    wrong = {
        (TABLES[k[0]], k[1]): (got.get(k), want.get(k))
        for k in set(got) | set(want)
        if got.get(k) != want.get(k)
    }
    assert not wrong, f"mirror != database, (mirror, database): {dict(list(wrong.items())[:20])}"


def has_last_versions(changes: list[cf.Change], db: State, base: State | None = None) -> bool:
    """Whether every resource's current version has arrived: the wait for quiescence. (Not
    every version: a change lost in the middle is then reported by the checks that follow,
    not by a wait that runs out.)"""
    latest = dict(base.versions) if base is not None else {}
    for c in changes:
        k = (c.resource_type, change_id(c))
        latest[k] = max(latest.get(k, 0), c.version)
    return all(latest.get(k, 0) >= v for k, v in db.versions.items())


def assert_snapshot_then_its_changes(
    changes: list[cf.Change], snapshot_rows: int, after: State
) -> dict[Key, list[int]]:
    """A SNAPSHOT stream's changes: its first `snapshot_rows` are the snapshot (each resource
    once), none after; versions consecutive from a resource's snapshot row, or from 1 for one
    new after it; sequences increasing; nothing rolled back; the mirror equals `after`. Each
    resource's versions as they arrived."""
    operations = [c.operation for c in changes]
    assert set(operations[:snapshot_rows]) == {cf.OPERATION_SNAPSHOT}, "changes in the snapshot"
    assert cf.OPERATION_SNAPSHOT not in operations[snapshot_rows:], "snapshot rows after it"
    snapshot_keys = Counter((c.resource_type, change_id(c)) for c in changes[:snapshot_rows])
    assert max(snapshot_keys.values()) == 1, "a resource twice in the snapshot"
    arrived = assert_versions_consecutive(changes)  # after a snapshot row: its version + 1, ...
    created_after = {k: v for k, v in arrived.items() if k not in snapshot_keys}
    wrong_start = {k: v[:3] for k, v in created_after.items() if v[0] != 1}
    assert not wrong_start, f"resources new after the snapshot, not from version 1: {wrong_start}"
    assert_sequences_increase(changes)
    assert_nothing_rolled_back(changes)
    assert_mirror_equals(mirror({}, changes), after)
    return arrived


async def stop(writers: asyncio.Task[None], watcher: Watcher | None) -> None:
    """The writers cancelled and the watcher closed, whatever state the test left them in."""
    writers.cancel()
    await asyncio.gather(writers, return_exceptions=True)
    if watcher is not None:
        await watcher.close()


def assert_load_reached_every_path(load: Load) -> None:
    missing = [name for name in load.PATHS if not load.done[name]]
    assert not missing, f"write paths that never succeeded: {missing} ({load.failed})"
    assert load.rolled_back, "no SQL transaction was rolled back"


# --- the tests --------------------------------------------------------------------------------


async def test_a_watcher_resumed_under_load_receives_every_committed_version_once(
    stubs: Stubs, feed_stub: cf_grpc.ChangeFeedServiceStub, engine: AsyncEngine
) -> None:
    rng = random.Random(SEED)
    load = await seeded_load(stubs, engine, rng)
    before = await read_state(engine)  # no writer runs: the watcher starts after all of it
    watcher = ResumedWatcher(feed_stub, max_batch_size=3)
    try:
        await watcher.until(lambda w: w.responses, "first response")
        assert watcher.responses[0].event == cf.CHANGE_FEED_EVENT_CAUGHT_UP

        async def cut_and_resume() -> None:
            loop = asyncio.get_running_loop()
            end = loop.time() + LOAD_SECONDS
            while loop.time() < end or watcher.resumes < RESUMES:
                await asyncio.sleep(rng.uniform(0.05, LOAD_SECONDS / (RESUMES + 1)))
                await watcher.resume()

        await asyncio.gather(load.run(LOAD_SECONDS), cut_and_resume())
        assert_load_reached_every_path(load)
        after = await read_state(engine)

        await watcher.until(
            lambda w: has_last_versions(w.changes, after, before),
            "every resource's last version",
            QUIESCENCE_WAIT,
        )
        # One more cut and resume once caught up: nothing may come again.
        await watcher.resume()
        await watcher.until(lambda w: w.segments[-1].responses, "a response after the last resume")
    finally:
        await watcher.close()

    changes = watcher.changes
    received = Counter(key(c) for c in changes)
    twice = {k: n for k, n in received.items() if n > 1}
    assert not twice, f"received more than once: {twice} (seed {SEED})"
    committed = {
        (kind, rid_, v)
        for (kind, rid_), version in after.versions.items()
        for v in range(before.versions.get((kind, rid_), 0) + 1, version + 1)
    }
    assert set(received) == committed, (
        f"missing {sorted(committed - set(received))[:20]}, "
        f"not committed {sorted(set(received) - committed)[:20]} (seed {SEED})"
    )
    assert_versions_consecutive(changes)
    assert_sequences_increase(changes)
    assert_nothing_rolled_back(changes)
    assert watcher.resumes >= RESUMES
    assert_mirror_equals(mirror(normalized(before), changes), after)


async def test_a_snapshot_started_mid_load_then_its_changes_mirror_the_database(
    stubs: Stubs, feed_stub: cf_grpc.ChangeFeedServiceStub, engine: AsyncEngine
) -> None:
    rng = random.Random(SEED + 1)
    load = await seeded_load(stubs, engine, rng)
    writers = asyncio.create_task(load.run(LOAD_SECONDS))
    watcher: Watcher | None = None
    try:
        await asyncio.sleep(LOAD_SECONDS / 3)  # the writers are at it
        watcher = Watcher(
            feed_stub,
            cf.WatchChangesRequest(start_position=cf.START_POSITION_SNAPSHOT, max_batch_size=7),
        )
        await writers
        assert_load_reached_every_path(load)
        after = await read_state(engine)

        await watcher.until(
            lambda w: has_last_versions(w.changes, after),
            "every resource's last version",
            QUIESCENCE_WAIT,
        )
    finally:
        await stop(writers, watcher)

    changes = watcher.changes
    done = [
        i for i, r in enumerate(watcher.responses) if r.event == cf.CHANGE_FEED_EVENT_SNAPSHOT_DONE
    ]
    assert len(done) == 1, "one SNAPSHOT_DONE"
    snapshot_rows = sum(len(r.changes) for r in watcher.responses[: done[0] + 1])
    assert snapshot_rows and len(changes) > snapshot_rows, "the load ran on both sides of it"
    arrived = assert_snapshot_then_its_changes(changes, snapshot_rows, after)
    last = {k: v[-1] for k, v in arrived.items()}
    wrong_last = {
        (TABLES[k[0]], k[1]): (last.get(k), after.versions.get(k))
        for k in set(last) | set(after.versions)
        if last.get(k) != after.versions.get(k)
    }
    assert not wrong_last, f"last version received != database's: {wrong_last} (seed {SEED})"


def key(change: cf.Change) -> tuple[int, int, int]:
    return (change.resource_type, change_id(change), change.version)


MID_SNAPSHOT_CUTS = 3  # at least this many cuts before SNAPSHOT_DONE
MAX_SNAPSHOT_CUTS = 12  # a bound: the snapshot holds every resource of the test database


async def test_a_snapshot_cut_and_resumed_mid_snapshot_under_load_mirrors_the_database(
    stubs: Stubs, feed_stub: cf_grpc.ChangeFeedServiceStub, engine: AsyncEngine
) -> None:
    """As the test above, with the snapshot itself cut every few responses and resumed from
    the last token while the writers run: each resumed part of the snapshot is read in a newer
    transaction than the part before, and still every resource is in the snapshot once and
    every change after its snapshot row arrives once, so the mirror equals the database."""
    rng = random.Random(SEED + 2)
    load = await seeded_load(stubs, engine, rng)
    writers = asyncio.create_task(load.run(LOAD_SECONDS))
    responses: list[cf.WatchChangesResponse] = []
    watcher: Watcher | None = None
    cuts = 0
    try:
        await asyncio.sleep(LOAD_SECONDS / 4)  # the writers are at it
        request = cf.WatchChangesRequest(
            start_position=cf.START_POSITION_SNAPSHOT, max_batch_size=7
        )
        done = False
        while not done:
            call = feed_stub.WatchChanges(request)
            try:
                # A few responses, then a cut; after MAX_SNAPSHOT_CUTS, the rest in one call.
                reads = rng.randint(1, 3) if cuts < MAX_SNAPSHOT_CUTS else 1 << 30
                for _ in range(reads):
                    response = await asyncio.wait_for(call.read(), WAIT)
                    assert response is not grpc.aio.EOF, "the stream ended"
                    responses.append(response)
                    if response.event == cf.CHANGE_FEED_EVENT_SNAPSHOT_DONE:
                        done = True
                        break
            finally:
                call.cancel()
            cuts += not done
            request = cf.WatchChangesRequest(
                resume_token=responses[-1].resume_token, max_batch_size=7
            )
            await asyncio.sleep(rng.uniform(0.05, 0.3))  # the writers change what is left
        watcher = Watcher(feed_stub, request)
        await writers
        assert_load_reached_every_path(load)
        after = await read_state(engine)
        await watcher.until(
            lambda w: has_last_versions(
                [*(c for r in responses for c in r.changes), *w.changes], after
            ),
            "every resource's last version",
            QUIESCENCE_WAIT,
        )
    finally:
        await stop(writers, watcher)

    assert cuts >= MID_SNAPSHOT_CUTS, f"only {cuts} cuts before SNAPSHOT_DONE: a snapshot too small"
    snapshot_rows = sum(len(r.changes) for r in responses)
    changes = [c for r in responses for c in r.changes] + watcher.changes
    received = Counter(key(c) for c in changes)
    twice = {k: n for k, n in received.items() if n > 1}
    assert not twice, f"received more than once: {twice} (seed {SEED})"
    assert_snapshot_then_its_changes(changes, snapshot_rows, after)
    print(f"\nsnapshot of {snapshot_rows} rows cut {cuts} times; {len(changes)} changes in all")
