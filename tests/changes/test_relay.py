"""The NATS JetStream relay (service/serving/relay.py) against the real nats-server at
127.0.0.1:4222 (this machine and CI run it; .ci/run checks that it answers), real `serve`
processes and a real PostgreSQL: what the stream holds after writes through the service, after
relays SIGKILLed mid-publish under load, and with two relays of which one must publish. Each
test has a stream of its own, deleted after it."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from shop.v1 import change_feed_service_pb2 as cf
from shop.v1 import change_feed_service_pb2_grpc as cf_grpc
from shop.v1 import resources_pb2 as pb
from shop.v1 import user_service_pb2 as users_api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import Settings
from service.serving.server import start_server
from tests import tools
from tests.changes.helpers import Watcher, change_id
from tests.process import ROOT, free_port, service_env, start_serve, wait_until_serving

NATS_URL = "nats://127.0.0.1:4222"
STORED_WAIT = 120.0  # hang guard: the relay publishes a change within milliseconds
KILLS = 5


def _nats_answers() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=3) as sock:
            info = sock.recv(4096).decode(errors="replace")
    except OSError:
        return None
    return NATS_URL if info.startswith("INFO") and '"jetstream":true' in info else None


NATS_SERVER = tools.Tool(
    "nats-server with JetStream at 127.0.0.1:4222",
    "start it: nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server & (Debian's "
    "nats-server; .ci/run checks that it answers)",
    _nats_answers,
)
NATS_PY = tools.Tool(
    "nats-py",
    f"the nats extra (in the dev extra): {tools.MAKE_INSTALL}",
    tools.python_modules("nats"),
)
pytestmark = [pytest.mark.requires(NATS_PY), pytest.mark.requires(NATS_SERVER)]


# --- the stream -------------------------------------------------------------------------------


class Stream:
    """A JetStream stream of this test's, read message by message."""

    def __init__(self, js: Any, name: str) -> None:
        self.js = js
        self.name = name

    async def count(self) -> int:
        from nats.js.errors import NotFoundError

        try:
            return int((await self.js.stream_info(self.name)).state.messages)
        except NotFoundError:
            return 0

    async def until_count(self, n: int, what: str) -> None:
        async def wait() -> None:
            while await self.count() < n:  # noqa: ASYNC110  (a poll of another server)
                await asyncio.sleep(0.05)

        try:
            await asyncio.wait_for(wait(), STORED_WAIT)
        except TimeoutError:
            stored = await self.count()
            raise AssertionError(f"{what}: {stored} of {n} within {STORED_WAIT}s") from None

    async def grows_by(self, n: int) -> None:
        await self.until_count(await self.count() + n, f"{n} more messages")

    async def messages(self) -> list[Any]:
        info = await self.js.stream_info(self.name)
        return [await self.js.get_msg(self.name, seq) for seq in range(1, info.state.last_seq + 1)]


@pytest.fixture
async def stream() -> AsyncIterator[Stream]:
    import nats

    client = await nats.connect(NATS_URL)
    js = client.jetstream()
    for info in await js.streams_info():
        if any(s.startswith("shop.changes.") for s in info.config.subjects or ()):
            pytest.fail(
                f"JetStream stream {info.config.name} already takes shop.changes.> on this "
                f"server: delete it (nats stream rm {info.config.name}) or stop its relay"
            )
    name = f"SHOP_TEST_{uuid.uuid4().hex[:12]}"
    try:
        yield Stream(js, name)
    finally:
        with suppress(Exception):
            await js.delete_stream(name)
        await client.close()


# --- what the stream must hold ----------------------------------------------------------------


async def logged(engine: AsyncEngine) -> list[tuple[int, int, int]]:
    """Every change the log holds, as (resource_type, id, version)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT c.resource_type, (e->1->>'id')::bigint, "
                "coalesce((e->1->>'version')::bigint, 1) "
                "FROM changes c, jsonb_array_elements(c.rows) e"
            )
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


def check_exactly_once_in_order(messages: list[Any], expected: list[tuple[int, int, int]]) -> None:
    """Stream sequence i holds Change.sequence i (its Nats-Msg-Id), on its own subject; every
    logged change once; per resource, versions 1, 2, 3, ... in stream order."""
    changes = []
    for i, message in enumerate(messages, start=1):
        change = cf.Change.FromString(message.data)
        kind = change.WhichOneof("resource")
        assert (message.seq, change.sequence) == (i, i), (message.seq, change.sequence)
        assert message.headers["Nats-Msg-Id"] == str(i)
        assert message.headers["Shop-Resume-Token"]
        assert message.subject == f"shop.changes.{kind}.{change_id(change)}"
        changes.append((change.resource_type, change_id(change), change.version))
    assert len(changes) == len(set(changes)), "a change stored twice"
    assert sorted(changes) == sorted(expected)
    versions: dict[tuple[int, int], list[int]] = defaultdict(list)
    for kind, resource_id, version in changes:
        versions[(kind, resource_id)].append(version)
    for key, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), (key, seen)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        body = answer.read().decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in body.splitlines()
        if line.startswith("shop_changes_relay_")
    }


# --- writers ----------------------------------------------------------------------------------


async def create_and_rename(stub: user_service_pb2_grpc.UserServiceStub, n: int) -> None:
    user = await stub.CreateUser(
        users_api.CreateUserRequest(
            email=f"r{n}-{uuid.uuid4().hex[:8]}@example.com", first_name="R", last_name=str(n)
        )
    )
    await stub.UpdateUser(
        users_api.UpdateUserRequest(
            user=pb.User(id=user.id, first_name="Renamed"),
            update_mask=FieldMask(paths=["first_name"]),
        )
    )


async def bulk_update(engine: AsyncEngine) -> None:
    """One statement that touches every user: a burst of changes in one transaction."""
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE users SET last_name = last_name || '+'"))


class Load:
    """Writers through the service (and bulk SQL) until stopped."""

    def __init__(self, stub: user_service_pb2_grpc.UserServiceStub, engine: AsyncEngine) -> None:
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._write(stub, w)) for w in range(4)]
        self._tasks.append(asyncio.create_task(self._bulk(engine)))

    async def _write(self, stub: user_service_pb2_grpc.UserServiceStub, writer: int) -> None:
        n = 0
        while not self._stop.is_set():
            await create_and_rename(stub, writer * 100_000 + n)
            n += 1

    async def _bulk(self, engine: AsyncEngine) -> None:
        while not self._stop.is_set():
            await bulk_update(engine)
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


# --- relays as `serve` processes --------------------------------------------------------------


class Relay:
    """`python -m service serve` with the relay on: its metrics port, SIGKILL on demand."""

    def __init__(self, database_url: str, stream: str, log: Path) -> None:
        port, self.metrics_port = free_port(), free_port()
        env = service_env(database_url, port) | {
            "SHOP_CHANGES_NATS_URL": NATS_URL,
            "SHOP_CHANGES_NATS_STREAM": stream,
            "SHOP_METRICS_PORT": str(self.metrics_port),
        }
        self.log = log
        with log.open("ab") as out:
            self.process = start_serve(env, out)
        wait_until_serving(f"127.0.0.1:{port}", self.process, log)

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # SIGKILL: no shutdown, the lock goes with the connection
        self.process.wait(timeout=10)


@pytest.fixture
def relays(database_url: str, stream: Stream, tmp_path: Path) -> Iterator[Callable[[], Relay]]:
    with ExitStack() as stack:
        count = 0

        def start() -> Relay:
            nonlocal count
            count += 1
            relay = Relay(database_url, stream.name, tmp_path / f"relay{count}.log")
            stack.callback(relay.kill)
            return relay

        yield start


async def until(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    async def wait() -> None:
        while True:
            result = check()
            if result if isinstance(result, bool) else await result:
                return
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(wait(), STORED_WAIT)
    except TimeoutError:
        raise AssertionError(f"not {what} within {STORED_WAIT}s") from None


# --- the tests --------------------------------------------------------------------------------


async def test_changes_made_through_the_service_are_stored_once_in_order(
    database_url: str, engine: AsyncEngine, stream: Stream
) -> None:
    """An in-process server with the relay on: the stream holds what WatchChanges sends, byte for
    byte, one message per change on shop.changes.<type>.<id>; the lag metric reads 0 once it
    is caught up; the example consumer prints them."""
    metrics_port = free_port()
    settings = Settings(
        grpc_host="127.0.0.1",
        grpc_port=0,
        changes_nats_url=NATS_URL,  # type: ignore[arg-type]
        changes_nats_stream=stream.name,
        metrics_port=metrics_port,
    )
    running = await start_server(settings, database_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            watcher = Watcher(
                cf_grpc.ChangeFeedServiceStub(channel), cf.WatchChangesRequest(max_batch_size=1)
            )
            await watcher.until(lambda w: w.responses, "first response")
            users = user_service_pb2_grpc.UserServiceStub(channel)
            for n in range(3):
                await create_and_rename(users, n)
            await bulk_update(engine)
            expected = await logged(engine)
            assert len(expected) == 9
            await stream.until_count(len(expected), "every change stored")
            watched = await watcher.changes_at_least(len(expected))
            await watcher.close()
            messages = await stream.messages()
            check_exactly_once_in_order(messages, expected)
            assert [m.data for m in messages] == [c.SerializeToString() for c in watched]
            await until(lambda: scrape(metrics_port)["shop_changes_relay_sequence"] == 9, "9")
            assert scrape(metrics_port) == {
                "shop_changes_relay_leader": 1.0,
                "shop_changes_relay_sequence": 9.0,
                "shop_changes_relay_lag_seconds": 0.0,
            }
    finally:
        await running.stop(grace=None)
    example = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "examples/nats_consumer.py", "--stream", stream.name, "--count", "9"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert example.returncode == 0, example.stderr
    lines = example.stdout.splitlines()
    assert len(lines) == 9, lines
    first = cf.Change.FromString(messages[0].data)
    assert lines[0].startswith(f"1 shop.changes.user.{first.user.id} OPERATION_CREATED v1 ")
    assert json.loads(lines[0].split(" ", 4)[4])["email"] == first.user.email


async def test_relays_killed_mid_publish_leave_every_change_once_in_order(
    engine: AsyncEngine,
    stream: Stream,
    relays: Callable[[], Relay],
    user_stub: user_service_pb2_grpc.UserServiceStub,
) -> None:
    """Five relays SIGKILLed while they publish under load, each replaced by a new process: the
    stream holds every logged change exactly once, in order, sequences without a gap."""
    load = Load(user_stub, engine)
    try:
        for _ in range(KILLS):
            relay = await asyncio.to_thread(relays)  # the load goes on while it starts
            await stream.grows_by(30)  # publishing now, with the load behind it
            relay.kill()
    finally:
        await load.stop()
    relays()
    expected = await logged(engine)
    assert len(expected) > KILLS * 30
    await stream.until_count(len(expected), "every change stored after the last restart")
    check_exactly_once_in_order(await stream.messages(), expected)


async def test_of_two_relays_one_publishes_and_the_other_takes_over_when_it_dies(
    engine: AsyncEngine,
    stream: Stream,
    relays: Callable[[], Relay],
    user_stub: user_service_pb2_grpc.UserServiceStub,
) -> None:
    """Two serve processes with the relay on the same stream: one holds the lock and publishes,
    the other publishes nothing; SIGKILL the publisher, and the other takes over where the
    stream ends."""
    first, second = relays(), relays()
    for n in range(5):
        await create_and_rename(user_stub, n)
    await stream.until_count(10, "the first 10 changes")
    both = [first, second]
    await until(lambda: sum(r.metrics()["shop_changes_relay_leader"] for r in both) == 1, "one")
    leader, follower = (
        (first, second) if first.metrics()["shop_changes_relay_leader"] else both[::-1]
    )
    await until(lambda: leader.metrics()["shop_changes_relay_sequence"] == 10, "acknowledged")
    assert follower.metrics()["shop_changes_relay_sequence"] == 0  # never published
    leader.kill()
    for n in range(5, 10):
        await create_and_rename(user_stub, n)
    await stream.until_count(20, "the 10 changes made after the kill")
    assert follower.metrics()["shop_changes_relay_leader"] == 1
    await until(lambda: follower.metrics()["shop_changes_relay_sequence"] == 20, "took over")
    check_exactly_once_in_order(await stream.messages(), await logged(engine))
