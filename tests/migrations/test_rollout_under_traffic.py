"""The orders.currency rollout (alembic/versions/0003..0006) applied to a live service.

Like a real deploy: build A serves a database from before the expand step (it was started
then, so it neither writes nor reads currency). Expand and backfill run under A's traffic.
Build B starts once the backfill is done (it writes and reads currency), A stops, and the
contract step and the concurrent index run under B's traffic. Unary (CreateOrder, GetOrder,
ListOrders) and streaming (StreamOrders) calls run throughout; none may fail, and every order
created, before or during the rollout, must be there afterwards with its currency."""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from shop.v1 import order_service_pb2 as api
from shop.v1 import order_service_pb2_grpc, user_service_pb2, user_service_pb2_grpc
from shop.v1 import resources_pb2 as pb
from sqlalchemy import text

from service.db.engine import create_unpooled_engine
from tests.migrations.conftest import serving

EXPAND = "0003"
BACKFILL = "0004"
SEEDED = 1200  # more than one backfill batch (0004's BATCH_SIZE is 1000)
CREATES_PER_STEP = 5  # creates that must complete after each migration step
STEP_TIMEOUT = 60.0  # a safety net against a hang, not a timing assertion


@dataclass
class Traffic:
    """Calls against one server until stopped; remembers what was created and what failed."""

    address: str
    user_id: int
    created: dict[int, pb.Order] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    calls: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    async def _loop(self, one: Callable[[order_service_pb2_grpc.OrderServiceStub], object]) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = order_service_pb2_grpc.OrderServiceStub(channel)
            while not self._stop.is_set():
                try:
                    await one(stub)  # type: ignore[misc]
                    self.calls += 1
                except grpc.aio.AioRpcError as error:
                    self.failures.append(f"{error.code().name}: {error.details()}")

    async def _create_and_read(self, stub: order_service_pb2_grpc.OrderServiceStub) -> None:
        request = api.CreateOrderRequest(
            user_id=self.user_id,
            request_id=f"{self.address}-{next(self._ids)}",
            items=[pb.OrderItem(sku="BOOK", quantity=2, unit_price="12.50")],
        )
        order = await stub.CreateOrder(request)
        self.created[order.id] = order
        fetched = await stub.GetOrder(api.GetOrderRequest(id=order.id))
        if fetched.id != order.id or fetched.total != "25.00":
            self.failures.append(f"GetOrder({order.id}) returned {fetched}")

    async def _list(self, stub: order_service_pb2_grpc.OrderServiceStub) -> None:
        # Filtered by status: the query the new index serves, while it is being built.
        await stub.ListOrders(api.ListOrdersRequest(status=pb.ORDER_STATUS_PENDING, page_size=50))

    async def _stream(self, stub: order_service_pb2_grpc.OrderServiceStub) -> None:
        seen = 0
        async for batch in stub.StreamOrders(api.StreamOrdersRequest(batch_size=500)):
            seen += len(batch.orders)
        if seen < SEEDED:
            self.failures.append(f"StreamOrders saw {seen} orders, fewer than the {SEEDED} seeded")

    def start(self) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self._loop(work))
            for work in (self._create_and_read, self._list, self._stream)
        ]

    async def until_created(self, count: int) -> None:
        """Let traffic run until `count` more orders were created (or something failed)."""
        target = len(self.created) + count

        async def wait() -> None:
            # Polling, not an Event: the condition spans three loops and the failure list.
            while len(self.created) < target and not self.failures:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

        await asyncio.wait_for(wait(), STEP_TIMEOUT)

    async def stop(self, tasks: list[asyncio.Task[None]]) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), STEP_TIMEOUT)


async def _migrate_under(traffic: Traffic, config: Config, revision: str) -> None:
    """`alembic upgrade revision` in a thread while traffic goes on, then more traffic."""
    await asyncio.wait_for(asyncio.to_thread(command.upgrade, config, revision), STEP_TIMEOUT)
    await traffic.until_created(CREATES_PER_STEP)


async def _seed(url: str, user_id: int) -> None:
    """SEEDED orders written in the pre-expand shape (no currency column yet)."""
    engine = create_unpooled_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO orders (user_id, status, total) "
                    "SELECT :user_id, 'pending', 1.00 FROM generate_series(1, :n)"
                ),
                {"user_id": user_id, "n": SEEDED},
            )
    finally:
        await engine.dispose()


async def _create_user(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        user = await stub.CreateUser(
            user_service_pb2.CreateUserRequest(
                email="rollout@example.com", first_name="Roll", last_name="Out"
            )
        )
    return int(user.id)


async def _database_facts(url: str) -> dict[str, object]:
    engine = create_unpooled_engine(url)
    try:
        async with engine.connect() as conn:
            facts = (
                await conn.execute(
                    text(
                        """
                        SELECT
                          (SELECT count(*) FROM orders) AS orders,
                          (SELECT count(*) FROM orders WHERE currency IS DISTINCT FROM 'EUR')
                            AS without_eur,
                          (SELECT is_nullable FROM information_schema.columns
                            WHERE table_name = 'orders' AND column_name = 'currency')
                            AS nullable,
                          (SELECT column_default FROM information_schema.columns
                            WHERE table_name = 'orders' AND column_name = 'currency')
                            AS column_default,
                          (SELECT count(*) FROM pg_constraint
                            WHERE conname = 'ck_orders_currency_not_null') AS helper_checks,
                          (SELECT indisvalid FROM pg_index
                            WHERE indexrelid = 'ix_orders_status_id'::regclass) AS index_valid,
                          (SELECT string_agg(version_num, ',') FROM alembic_version) AS version
                        """
                    )
                )
            ).one()
            return dict(facts._mapping)
    finally:
        await engine.dispose()


async def test_currency_rollout_under_traffic(
    scratch_url: str, scratch_config: Config, tmp_path: Path
) -> None:
    script = ScriptDirectory.from_config(scratch_config)
    before_expand = script.get_revision(EXPAND).down_revision
    assert isinstance(before_expand, str)
    await asyncio.to_thread(command.upgrade, scratch_config, before_expand)
    behind = {"SHOP_ALLOW_SCHEMA_BEHIND": "true", "SHOP_SHUTDOWN_GRACE": "5"}

    with serving(scratch_url, tmp_path / "a.log", **behind) as (address_a, process_a):
        user_id = await _create_user(address_a)
        await _seed(scratch_url, user_id)
        old = Traffic(address_a, user_id)
        tasks = old.start()
        await old.until_created(CREATES_PER_STEP)
        await _migrate_under(old, scratch_config, EXPAND)
        await _migrate_under(old, scratch_config, BACKFILL)
        await old.stop(tasks)
        assert old.failures == [], (tmp_path / "a.log").read_text()

        # The new build starts on the backfilled schema (still behind head: contract pending).
        with serving(scratch_url, tmp_path / "b.log", **behind) as (address_b, _):
            process_a.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process_a.wait, STEP_TIMEOUT) == 0

            new = Traffic(address_b, user_id)
            tasks = new.start()
            await new.until_created(CREATES_PER_STEP)
            await _migrate_under(new, scratch_config, "head")
            await new.stop(tasks)
            assert new.failures == [], (tmp_path / "b.log").read_text()

            async with grpc.aio.insecure_channel(address_b) as channel:
                stub = order_service_pb2_grpc.OrderServiceStub(channel)
                streamed = {
                    o.id: o
                    async for batch in stub.StreamOrders(api.StreamOrdersRequest())
                    for o in batch.orders
                }
                # Every order created through either build is readable by id, with currency.
                for order_id in (*old.created, *new.created):
                    fetched = await stub.GetOrder(api.GetOrderRequest(id=order_id))
                    assert fetched.currency == "EUR", order_id

    created = {**old.created, **new.created}
    assert len(created) == len(old.created) + len(new.created)  # no id handed out twice
    # Build A never read currency (its schema had none when it started); B always does.
    assert {o.currency for o in old.created.values()} == {""}
    assert {o.currency for o in new.created.values()} == {"EUR"}
    # No row lost, none added: seeded + created, all of them streamed, all with EUR.
    assert len(streamed) == SEEDED + len(created)
    assert set(created) <= set(streamed)
    assert {o.currency for o in streamed.values()} == {"EUR"}
    assert await _database_facts(scratch_url) == {
        "orders": SEEDED + len(created),
        "without_eur": 0,
        "nullable": "NO",
        "column_default": None,
        "helper_checks": 0,
        "index_valid": True,
        "version": ",".join(script.get_heads()),
    }
