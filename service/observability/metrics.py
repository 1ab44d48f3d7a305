"""Prometheus metrics: one CollectorRegistry per server (so several servers can share a process),
RPC counters and histograms fed by the observability interceptor, pool gauges read on scrape, and
the HTTP endpoint on SHOP_METRICS_HOST:SHOP_METRICS_PORT."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from service.config import Settings

_RPC_LABELS = ("grpc_service", "grpc_method")
# Unary calls take milliseconds; streams and pool waits can take the pool timeout (30 s).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RpcMetrics:
    """The RPC series, named as go-grpc-prometheus names them so stock dashboards fit."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed, by method and status code.",
            (*_RPC_LABELS, "grpc_code"),
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status.",
            _RPC_LABELS,
            buckets=_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "grpc_server_in_flight", "RPCs being served now.", _RPC_LABELS, registry=registry
        )
        self.messages_sent = Counter(
            "grpc_server_msg_sent", "Response messages sent.", _RPC_LABELS, registry=registry
        )
        self.rows_sent = Counter(
            "shop_stream_rows_sent",
            "Rows sent by streaming RPCs (the repeated entries of each batch).",
            _RPC_LABELS,
            registry=registry,
        )


class PoolCollector(Collector):
    """Reads the engine's connection pool at scrape time, so the numbers are never stale."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pool = self.engine.sync_engine.pool
        if not isinstance(pool, QueuePool):  # NullPool and friends keep no numbers
            return
        yield GaugeMetricFamily(
            "shop_db_pool_checked_out", "Connections in use.", value=pool.checkedout()
        )
        # QueuePool counts overflow from -pool_size up; below zero means no overflow in use.
        yield GaugeMetricFamily(
            "shop_db_pool_overflow",
            "Connections open beyond the pool size.",
            value=max(pool.overflow(), 0),
        )
        yield GaugeMetricFamily(
            "shop_db_pool_size", "Connections the pool keeps.", value=pool.size()
        )


class FeedLag(Protocol):
    """What the change feed (service/app/changes.py ChangeFeed) shows of its streams."""

    def lag(self) -> tuple[int, float, int]: ...


class FeedCollector(Collector):
    """The change feed's streams and lag, read at scrape time."""

    def __init__(self, feed: FeedLag) -> None:
        self.feed = feed

    def collect(self) -> Iterator[GaugeMetricFamily]:
        streams, seconds, changes = self.feed.lag()
        yield GaugeMetricFamily(
            "shop_changes_watchers", "WatchChanges streams served by this process.", value=streams
        )
        yield GaugeMetricFamily(
            "shop_changes_lag_seconds",
            "Seconds the furthest-behind WatchChanges stream of this process has spent since it "
            "was last caught up with the newest commit (0 when every stream is).",
            value=seconds,
        )
        yield GaugeMetricFamily(
            "shop_changes_lag_changes",
            "Changes committed (of every type, as the shared poll counted them) since the "
            "furthest-behind WatchChanges stream of this process was last caught up, or since "
            "it started (0 when every stream is caught up).",
            value=changes,
        )


class RelayProgress(Protocol):
    """What the NATS relay (service/serving/relay.py) shows of itself."""

    @property
    def leader(self) -> bool: ...
    @property
    def sequence(self) -> int: ...
    def lag_seconds(self) -> float: ...


class RelayCollector(Collector):
    """The change relay's state, read at scrape time."""

    def __init__(self, relay: RelayProgress) -> None:
        self.relay = relay

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "shop_changes_relay_leader",
            "1 while this process holds the relay's cluster lock and publishes.",
            value=int(self.relay.leader),
        )
        yield GaugeMetricFamily(
            "shop_changes_relay_sequence",
            "Sequence of the last change this process published to JetStream.",
            value=self.relay.sequence,
        )
        yield GaugeMetricFamily(
            "shop_changes_relay_lag_seconds",
            "Seconds since the commit of the change being published; 0 once caught up.",
            value=self.relay.lag_seconds(),
        )


@dataclass
class MetricsEndpoint:
    """The HTTP server that answers /metrics, on a thread of its own."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def server_metrics(settings: Settings, engine: AsyncEngine) -> RpcMetrics | None:
    """A fresh registry with the RPC series and the pool collector; None when metrics are off."""
    if not settings.metrics_port:
        return None
    registry = CollectorRegistry()
    registry.register(PoolCollector(engine))
    return RpcMetrics(registry)


def serve_metrics(settings: Settings, metrics: RpcMetrics | None) -> MetricsEndpoint | None:
    """Start the /metrics endpoint when metrics are on."""
    if metrics is None:
        return None
    server, thread = start_http_server(
        settings.metrics_port, addr=settings.metrics_host, registry=metrics.registry
    )
    return MetricsEndpoint(server, thread)
