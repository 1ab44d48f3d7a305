"""Builds and runs the grpc.aio server: servicers, interceptors, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from shop.v1 import (
    account_service_pb2,
    account_service_pb2_grpc,
    change_feed_service_pb2,
    change_feed_service_pb2_grpc,
    order_service_pb2,
    order_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.accounts import AccountServicer
from service.api.accounts_convert import ANSWERS
from service.api.changes import ChangeFeedServicer
from service.api.interceptors.admission import AdmissionInterceptor
from service.api.interceptors.auth import AuthInterceptor, TokenTable
from service.api.interceptors.call_scope import CallScopeInterceptor
from service.api.interceptors.errors import ErrorInterceptor
from service.api.interceptors.observability import ObservabilityInterceptor
from service.api.interceptors.shutdown import ActiveStreams
from service.api.interceptors.streams import StreamWriter
from service.api.interceptors.wrapping import Interceptor, fused
from service.api.orders import OrderServicer
from service.api.paging import PageTokens
from service.api.users import UserServicer
from service.api.users_encode import serialize_user_batch
from service.app.accounts import Accounts
from service.app.changes import ChangeFeed
from service.app.orders import Orders
from service.app.users import Users
from service.config import Settings
from service.db.closing import dispose_within
from service.db.database import Database
from service.db.engine import create_engine, create_probe_engine, create_sessionmaker
from service.db.replicas import open_replicas
from service.db.schema_state import SchemaFeatures, serving_features, session_info
from service.observability.metrics import (
    BatchCollector,
    FeedCollector,
    MetricsEndpoint,
    RelayCollector,
    RpcMetrics,
    Sampler,
    sample_metrics,
    serve_metrics,
    server_metrics,
)
from service.observability.tracing import Tracing, start_tracing
from service.serving.health import HealthProbe, HealthService
from service.serving.limits import compression, limit_options
from service.serving.reflection import enable_reflection
from service.serving.relay import ChangeRelay, relay_from_settings
from service.serving.security import check_exposure, exposure_warnings
from service.serving.shutdown import StopSignals
from service.serving.tls import server_credentials

log = logging.getLogger(__name__)

USER_SERVICE = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
SHOP_SERVICES = (
    USER_SERVICE,
    order_service_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name,
    account_service_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name,
    change_feed_service_pb2.DESCRIPTOR.services_by_name["ChangeFeedService"].full_name,
)


# After the grace: how long a batch already running (a money batch waiting on a row lock, say)
# may go on before it is cancelled and rolled back. Its callers were answered by then.
BATCH_DRAIN_SECONDS = 5.0
# Closing the pool: a database that answers acknowledges each connection's close in about a
# millisecond; one that went silent never does, and its connections are terminated after this.
POOL_CLOSE_SECONDS = 3.0


@dataclass
class RunningServer:
    """A started server and what it owns."""

    server: grpc.aio.Server
    port: int
    health: HealthService
    engine: AsyncEngine
    db: Database | None = None
    metrics: MetricsEndpoint | None = None
    probe: HealthProbe | None = None
    streams: ActiveStreams | None = None
    relay: ChangeRelay | None = None
    tracing: Tracing | None = None
    sampler: Sampler | None = None

    async def drain(self, delay: float, cut_short: asyncio.Event | None = None) -> None:
        """Health NOT_SERVING at once, while every RPC is still served for `delay` seconds (or
        until `cut_short` is set): a balancer polling health moves traffic away before any
        call is refused."""
        await self.health.enter_graceful_shutdown()
        if delay <= 0:
            return
        log.info("health NOT_SERVING; still serving for %.1fs (a second signal skips it)", delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for((cut_short or asyncio.Event()).wait(), delay)

    async def stop(self, grace: float | None, cut_short: asyncio.Event | None = None) -> None:
        """NOT_SERVING (if drain() did not say so already); then new calls are refused and
        streams end at once, while unary calls get `grace` seconds to finish; batches already
        running finish (a money batch commits for its callers, even those cut off by the
        grace); then the pools close, within POOL_CLOSE_SECONDS even if the database is
        silent.

        If a stream was behind its reader within the grace before (a proxy may still hold part of
        it), the connections stay open for the rest of the grace (or until `cut_short` is set):
        see _hold_connections."""
        await self.health.enter_graceful_shutdown()
        log.info("refusing new calls; streams told to stop, unary calls get %ss", grace)
        loop = asyncio.get_running_loop()
        deadline = None if grace is None else loop.time() + grace
        if self.streams is not None:
            self.streams.stop()
            behind_at = self.streams.behind_at
            if grace and behind_at is not None and loop.time() - behind_at < grace:
                await self._hold_connections(loop.time() + grace, cut_short)
        if self.relay is not None:  # its lock goes with it: another process takes over
            await self.relay.stop()
        await self.server.stop(None if deadline is None else max(0.0, deadline - loop.time()))
        log.info("calls ended; closing the database pool")
        if self.db is not None:
            await self.db.drain(BATCH_DRAIN_SECONDS)
        if self.probe is not None:
            await self.probe.stop()
        await dispose_within(self.engine, POOL_CLOSE_SECONDS)
        if self.db is not None:
            await self.db.close_replicas(POOL_CLOSE_SECONDS)
        if self.tracing is not None:
            await self.tracing.flush()  # the last calls' spans, their SQL's too, before the exit
        if self.metrics is not None:
            self.metrics.close()
        if self.sampler is not None:
            self.sampler.close()

    async def _hold_connections(self, deadline: float, cut_short: asyncio.Event | None) -> None:
        """Keep the connections open until `deadline` (or `cut_short`), GOAWAY not yet sent.

        Through a proxy, a cut stream's status reaches its reader only after the bytes the
        proxy still holds for it; Envoy keeps the end of such a backed-up stream buffered
        behind them, and drops it (resetting the stream: the client sees INTERNAL) if the
        upstream connection closes first. grpc closes a connection as soon as its last stream
        ends once server.stop() has sent GOAWAY (the same for a stream that ended on its own a
        moment ago, its tail still in the proxy), so GOAWAY waits: new calls are refused by
        ActiveStreams meanwhile, unary calls run on, and the proxy delivers the tail at the
        reader's pace. The wait ends with the grace, which bounds it; a reader too slow to take
        the proxy's buffered bytes within it still sees a reset (and resumes all the same).
        """
        assert self.streams is not None
        loop = asyncio.get_running_loop()
        log.info(
            "a stream's reader was behind %.1fs ago: connections held %.1fs for its tail",
            loop.time() - (self.streams.behind_at or loop.time()),
            deadline - loop.time(),
        )
        with contextlib.suppress(TimeoutError):
            left = max(0.0, deadline - loop.time())
            await asyncio.wait_for((cut_short or asyncio.Event()).wait(), left)


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """Channel arguments for grpc.aio.server (message sizes, keepalive, ...)."""
    return [*limit_options(settings), ("grpc.so_reuseport", int(settings.workers > 1))]


def interceptors(settings: Settings, metrics: RpcMetrics | None = None) -> list[Interceptor]:
    """Outermost first: request id, access log and metrics see every outcome, auth's and
    admission's refusals included; admission after auth, so a call without a valid token is
    refused before it takes a slot; the error interceptor sits innermost, next to the servicers."""
    chain: list[Interceptor] = [ObservabilityInterceptor(metrics)]
    tokens = TokenTable.from_settings(settings)
    if tokens is not None:
        chain.append(AuthInterceptor(tokens))
    chain.append(AdmissionInterceptor.from_settings(settings))
    chain.append(ErrorInterceptor())
    chain.append(CallScopeInterceptor())
    return chain


def add_shop_services(
    server: grpc.aio.Server, db: Database, settings: Settings, features: SchemaFeatures
) -> ChangeFeed:
    """The shop.v1 servicers on `server`; returns the change feed (its lag is a metric)."""
    tokens = PageTokens(settings.page_token_secret.get_secret_value().encode())
    users = UserServicer(Users(db), tokens)
    user_service_pb2_grpc.add_UserServiceServicer_to_server(users, server)
    # StreamUsers yields batches the compiled encoder has already serialized (users_encode.py):
    # the method again, with a serializer that sends their bytes as they are. A registered
    # method handler takes precedence over the generic handler registered just above.
    server.add_registered_method_handlers(  # type: ignore[attr-defined]  # not in grpc-stubs
        USER_SERVICE,
        {
            "StreamUsers": grpc.unary_stream_rpc_method_handler(
                users.StreamUsers,
                request_deserializer=user_service_pb2.StreamUsersRequest.FromString,
                response_serializer=serialize_user_batch,
            )
        },
    )
    order_service_pb2_grpc.add_OrderServiceServicer_to_server(
        OrderServicer(Orders(db), tokens), server
    )
    account_service_pb2_grpc.add_AccountServiceServicer_to_server(
        AccountServicer(Accounts(db, ANSWERS), tokens), server
    )
    feed = ChangeFeed(
        db,
        poll_interval=settings.changes_poll_interval,
        heartbeat=settings.changes_heartbeat,
        readers=settings.stream_budget(),
        enabled=features.change_log,
    )
    change_feed_service_pb2_grpc.add_ChangeFeedServiceServicer_to_server(
        ChangeFeedServicer(feed, tokens), server
    )
    return feed


def bind(server: grpc.aio.Server, settings: Settings) -> int:
    """Listen on SHOP_GRPC_HOST:SHOP_GRPC_PORT, with TLS when configured; returns the port."""
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    credentials = server_credentials(settings)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


async def start_server(settings: Settings, database_url: str) -> RunningServer:
    """Create the engine and the server, bind, start serving; health follows the database."""
    check_exposure(settings)
    engine = create_engine(settings, database_url)
    try:
        # Refuses (SchemaBehind) a database that misses migrations, unless told otherwise.
        features = await serving_features(engine, allow_behind=settings.allow_schema_behind)
    except BaseException:
        await engine.dispose()
        raise
    metrics = server_metrics(settings, engine)
    # Innermost of all, so its "server shutting down" passes through the others like any abort.
    streams = ActiveStreams(exempt=[health.SERVICE_NAME])
    tracing = start_tracing(settings, engine)
    server = grpc.aio.server(
        # One interceptor per run of wrapping ones (grpc.aio awaits each one per call).
        interceptors=fused(
            [
                # Outermost: a cancelled stream closes its whole chain in the call's own task.
                StreamWriter(settings.stream_stall_timeout),
                *tracing.interceptors,
                *interceptors(settings, metrics),
                streams,
            ]
        ),
        options=server_options(settings),
        compression=compression(settings),
    )
    info = session_info(features)
    db = Database(
        engine,
        create_sessionmaker(engine, info),
        open_replicas(settings, info),
        stream_connections=settings.stream_budget(),
        tracing=tracing.batches,
    )
    feed = add_shop_services(server, db, settings, features)
    if metrics is not None:
        metrics.add_collector(FeedCollector(feed))
        metrics.add_collector(BatchCollector(db))
    relay = relay_from_settings(settings, database_url, db, features)
    if metrics is not None and relay is not None:
        metrics.add_collector(RelayCollector(relay))
    health_service = HealthService(("", *SHOP_SERVICES))
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    enable_reflection((*SHOP_SERVICES, health.SERVICE_NAME), server)
    port = bind(server, settings)
    probe = HealthProbe(
        health_service,
        create_probe_engine(database_url, settings.health_timeout),
        settings.health_interval,
        settings.health_timeout,
    )
    await server.start()
    await probe.probe_once()  # so health is already true when start_server returns
    probe.start()
    await db.start_replicas()
    if relay is not None:
        relay.start()
    transport = (
        "plaintext"
        if settings.tls_cert is None
        else "mutual TLS"
        if settings.tls_client_ca is not None
        else "TLS"
    )
    log.info("serving shop.v1 on %s:%d (%s)", settings.grpc_host, port, transport)
    for warning in exposure_warnings(settings):
        log.warning("%s", warning)
    endpoint = serve_metrics(settings, metrics)
    if endpoint is not None:
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, endpoint.port)
    return RunningServer(
        server,
        port,
        health_service,
        engine,
        db,
        endpoint,
        probe=probe,
        streams=streams,
        relay=relay,
        tracing=tracing,
        sampler=sample_metrics(metrics),
    )


async def serve(settings: Settings, database_url: str) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    log.info("settings: %s", settings.safe_dump())
    # Before the server starts: a signal that lands while it starts (a deploy rolled back, a
    # Ctrl-C) is a graceful stop once it has started, never Python's default of dying at once.
    signals = StopSignals().install()
    running = await start_server(settings, database_url)
    with contextlib.suppress(asyncio.CancelledError):
        await signals.first.wait()
    log.info(
        "%s: shutting down (drain delay %.1fs, grace %.1fs)",
        signals.name,
        settings.shutdown_drain_delay,
        settings.shutdown_grace,
    )
    await running.drain(settings.shutdown_drain_delay, signals.again)
    await running.stop(settings.shutdown_grace, signals.again)
    log.info("stopped: calls finished, database pool closed")
