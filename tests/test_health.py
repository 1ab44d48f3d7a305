"""grpc.health.v1 follows the database: a server (start_server, real channel) on a PostgreSQL
of the test's own, which the test stops and starts; and Check costs no query."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import event

from service.config import Settings
from service.db.migrate import upgrade
from service.serving.server import SHOP_SERVICES, RunningServer, start_server
from tests import tools
from tests.faults.own_postgres import OwnPostgres, own_postgres

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAIT = 20.0  # bound on any one expected change; the probe runs every 0.2 s here


@pytest.fixture(scope="module")
def pg() -> Iterator[OwnPostgres]:
    tools.require(tools.POSTGRES_SERVER)
    with own_postgres() as server:
        upgrade(server.url())  # the server refuses to start on a schema behind this build
        yield server


@pytest_asyncio.fixture
async def probed(pg: OwnPostgres) -> AsyncIterator[RunningServer]:
    if not pg.is_running():
        pg.start()
    settings = Settings(grpc_port=0, health_interval=0.2, health_timeout=1.0)
    running = await start_server(settings, pg.url())
    try:
        yield running
    finally:
        await running.stop(grace=None)


async def _check(stub: health_pb2_grpc.HealthStub, service: str = "") -> Any:
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


async def _next_status(watch: Any) -> Any:
    reply = await asyncio.wait_for(watch.read(), WAIT)
    assert reply is not grpc.aio.EOF, "Watch ended early"
    return reply.status


async def _drain(call: Any) -> None:
    """Read until the stream ends, however it ends (its status is then in call.code())."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        while await call.read() is not grpc.aio.EOF:
            pass


async def test_health_follows_the_database_and_watch_sees_it(
    probed: RunningServer, pg: OwnPostgres
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{probed.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", *SHOP_SERVICES):
            assert await _check(stub, name) == SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        assert await _next_status(watch) == SERVING

        await asyncio.to_thread(pg.stop, "fast")
        assert await _next_status(watch) == NOT_SERVING
        for name in ("", *SHOP_SERVICES):
            assert await _check(stub, name) == NOT_SERVING

        await asyncio.to_thread(pg.start)
        assert await _next_status(watch) == SERVING
        assert await _check(stub, "shop.v1.AccountService") == SERVING

        # Shutdown: the watcher hears NOT_SERVING, then its stream ends cleanly, well within
        # the grace (which only ends early because nothing is left running).
        await asyncio.wait_for(probed.stop(grace=WAIT), WAIT)
        assert await _next_status(watch) == NOT_SERVING
        assert await asyncio.wait_for(watch.read(), WAIT) is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK


async def test_unknown_service_is_not_found(probed: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{probed.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _check(stub, "shop.v1.NoSuchService")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # Watch on an unknown name says SERVICE_UNKNOWN rather than failing (per the spec).
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="shop.v1.NoSuchService"))
        status = await _next_status(watch)
        assert status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        watch.cancel()


async def test_check_answers_from_the_stored_status(database_url: str) -> None:
    """A long interval: after the first probe nothing queries, however many Checks come."""
    settings = Settings(grpc_port=0, health_interval=3600)
    running = await start_server(settings, database_url)
    assert running.probe is not None
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(running.probe.engine.sync_engine, "before_cursor_execute", record)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(20):
                assert await _check(stub) == SERVING
        assert statements == []
        # The probe itself does query (so the listener above would have seen a Check query).
        assert await running.probe.probe_once() is True
        assert any("SELECT 1" in s for s in statements)
    finally:
        event.remove(running.probe.engine.sync_engine, "before_cursor_execute", record)
        await running.stop(grace=None)


async def test_no_stream_outlives_shutdown(probed: RunningServer) -> None:
    """Reflection's bidirectional stream is told to stop with UNAVAILABLE at shutdown."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{probed.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests: asyncio.Queue[Any] = asyncio.Queue()

        async def outgoing() -> AsyncIterator[Any]:
            while True:
                yield await requests.get()

        call = stub.ServerReflectionInfo(outgoing())
        await requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
        first = await asyncio.wait_for(call.read(), WAIT)
        names = {s.name for s in first.list_services_response.service}
        assert set(SHOP_SERVICES) <= names
        assert probed.streams is not None and probed.streams.active == 1

        # No grace at all would cancel it anyway: give a long one, the stream must not wait.
        stopping = asyncio.create_task(probed.stop(grace=WAIT))
        await asyncio.wait_for(_drain(call), WAIT)
        assert await call.code() == grpc.StatusCode.UNAVAILABLE
        assert await call.details() == "server shutting down"
        await asyncio.wait_for(stopping, WAIT)


async def test_not_serving_until_the_first_probe_answers(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first probe is held back: the server already answers on its port, and says
    NOT_SERVING for every name until the probe has answered."""
    from service.serving import server as server_module
    from service.serving.health import HealthProbe

    probing, release = asyncio.Event(), asyncio.Event()
    database_answers = HealthProbe.database_answers
    OURS = 7201.0  # this server's health interval, no other test's; no second probe here

    async def held_back(probe: HealthProbe) -> bool:
        # The event loop is the session's: other tests' servers may still be probing, and
        # the patch is on the class. Only this test's server probes every OURS seconds.
        if probe.interval == OURS:
            probing.set()
            await release.wait()
        return await database_answers(probe)

    monkeypatch.setattr(HealthProbe, "database_answers", held_back)
    # start_server reports the port only once the first probe is done, so the test learns
    # the port the kernel chose from bind itself. (A port picked free beforehand could be
    # taken by someone else before the server binds it.)
    bound: list[int] = []
    bind = server_module.bind

    def bind_and_tell(server: grpc.aio.Server, settings: Settings) -> int:
        bound.append(bind(server, settings))
        return bound[-1]

    monkeypatch.setattr(server_module, "bind", bind_and_tell)
    starting = asyncio.create_task(
        start_server(Settings(grpc_port=0, health_interval=OURS), database_url)
    )
    try:
        await asyncio.wait_for(probing.wait(), WAIT)  # the server started before the probe
        (port,) = bound
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", *SHOP_SERVICES):
                assert await _check(stub, name) == NOT_SERVING
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            assert await _next_status(watch) == NOT_SERVING

            release.set()
            await asyncio.wait_for(asyncio.shield(starting), WAIT)
            assert await _next_status(watch) == SERVING
            for name in ("", *SHOP_SERVICES):
                assert await _check(stub, name) == SERVING
            watch.cancel()
    finally:
        release.set()
        await (await starting).stop(grace=None)
