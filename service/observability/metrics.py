"""Prometheus metrics: one CollectorRegistry per server (so several servers can share a process),
RPC counters and histograms fed by the observability interceptor, pool gauges read on scrape, and
the HTTP endpoint on SHOP_METRICS_HOST:SHOP_METRICS_PORT.

With SHOP_WORKERS > 1 the workers share one endpoint, served by their parent: prometheus-client's
multiprocess mode. The parent names a directory in PROMETHEUS_MULTIPROC_DIR before it starts the
workers, so every worker's series are kept in memory-mapped files there, and the parent's
/metrics adds them up (MultiProcessCollector). What a worker's collectors read at scrape time
(the pool, the change feed, the relay) cannot be read from the parent: a worker copies it into
gauges of the shared directory every SAMPLE_SECONDS instead (SampledCollectors).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from service.config import Settings

_RPC_LABELS = ("grpc_service", "grpc_method")
# Unary calls take milliseconds; streams and pool waits can take the pool timeout (30 s).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Where the workers of one `serve` keep their series (prometheus-client reads it when it is first
# imported, so it is set before a worker starts).
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
# How often a worker copies its scrape-time gauges into the shared directory.
SAMPLE_SECONDS = 1.0

GaugeMode = Literal["livesum", "livemax", "sum"]
# How the parent adds up each sampled gauge over the live workers (default livesum): a lag or a
# position is the furthest one, a count is the sum.
_SAMPLED_MODES: dict[str, GaugeMode] = {
    "shop_changes_lag_seconds": "livemax",
    "shop_changes_lag_changes": "livemax",
    "shop_changes_relay_sequence": "livemax",
    "shop_changes_relay_lag_seconds": "livemax",
    # Counters: a worker's counts stay in the sum after it exits, so the total never goes down.
    "shop_batches_total": "sum",
    "shop_batch_requests_total": "sum",
}


def in_shared_mode() -> bool:
    """True in a worker of several: its series go to the directory its parent serves."""
    return MULTIPROCESS_DIR in os.environ


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
            "grpc_server_in_flight",
            "RPCs being served now.",
            _RPC_LABELS,
            registry=registry,
            multiprocess_mode="livesum",
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
        self.sampled = SampledCollectors() if in_shared_mode() else None

    def add_collector(self, collector: Collector) -> None:
        """Read `collector` at scrape time; in a worker of several, every SAMPLE_SECONDS."""
        if self.sampled is None:
            self.registry.register(collector)
        else:
            self.sampled.collectors.append(collector)


class SampledCollectors:
    """A worker's scrape-time collectors, copied into multiprocess gauges on a timer."""

    def __init__(self) -> None:
        self.collectors: list[Collector] = []
        self.gauges: dict[str, Gauge] = {}

    def sample(self) -> None:
        for collector in self.collectors:
            for family in collector.collect():
                for sample in family.samples:
                    labels = sorted(sample.labels)
                    gauge = self.gauges.get(sample.name)
                    if gauge is None:
                        gauge = self.gauges[sample.name] = Gauge(
                            sample.name,
                            family.documentation,
                            labels,
                            registry=None,
                            multiprocess_mode=_SAMPLED_MODES.get(sample.name, "livesum"),
                        )
                    (gauge.labels(**sample.labels) if labels else gauge).set(sample.value)


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


class BatchCounts(Protocol):
    """What the batchers (db/coalescer.py, through db/database.py) count."""

    def batch_counts(self) -> list[tuple[str, int, int]]: ...


class BatchCollector(Collector):
    """Batches run and the requests they took, per batcher (group commit, coalesced reads):
    their ratio is the average batch, what a batch's fixed cost is shared by."""

    def __init__(self, source: BatchCounts) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        batches = CounterMetricFamily(
            "shop_batches", "Batches run, by batcher.", labels=("batcher",)
        )
        requests = CounterMetricFamily(
            "shop_batch_requests",
            "Requests answered by batches (a BatchTransfer's items each count), by batcher.",
            labels=("batcher",),
        )
        for name, ran, took in self.source.batch_counts():
            batches.add_metric((name,), ran)
            requests.add_metric((name,), took)
        yield batches
        yield requests


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


class Sampler:
    """A worker's thread that copies its scrape-time gauges into the shared directory, once at
    start (so a scrape right after start sees the pool) and then every SAMPLE_SECONDS."""

    def __init__(self, sampled: SampledCollectors) -> None:
        self.sampled = sampled
        self.stopping = threading.Event()
        sampled.sample()
        self.thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(SAMPLE_SECONDS):
            self.sampled.sample()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)


def server_metrics(settings: Settings, engine: AsyncEngine) -> RpcMetrics | None:
    """A fresh registry with the RPC series and the pool collector; None when metrics are off."""
    if not settings.metrics_port:
        return None
    metrics = RpcMetrics(CollectorRegistry())
    metrics.add_collector(PoolCollector(engine))
    return metrics


def serve_metrics(settings: Settings, metrics: RpcMetrics | None) -> MetricsEndpoint | None:
    """Start the /metrics endpoint when metrics are on (not in a worker of several: its parent
    serves them all)."""
    if metrics is None or metrics.sampled is not None:
        return None
    return _endpoint(settings, metrics.registry)


def sample_metrics(metrics: RpcMetrics | None) -> Sampler | None:
    """In a worker of several, start copying its scrape-time gauges for the parent."""
    if metrics is None or metrics.sampled is None:
        return None
    return Sampler(metrics.sampled)


def _endpoint(settings: Settings, registry: CollectorRegistry) -> MetricsEndpoint:
    server, thread = start_http_server(
        settings.metrics_port, addr=settings.metrics_host, registry=registry
    )
    return MetricsEndpoint(server, thread)


@contextmanager
def workers_metrics(settings: Settings) -> Iterator[str | None]:
    """In the parent of several workers: the shared directory (yielded, and exported in
    MULTIPROCESS_DIR for the workers it starts) and one /metrics that adds up every worker's
    series. A directory the operator named in PROMETHEUS_MULTIPROC_DIR is emptied first, since
    a previous run's files would be added in; else a fresh one is made and removed at the end.
    Yields None with metrics off."""
    if not settings.metrics_port:
        yield None
        return
    named = os.environ.get(MULTIPROCESS_DIR)
    directory = named or tempfile.mkdtemp(prefix="shop-metrics-")
    _empty(directory)
    os.environ[MULTIPROCESS_DIR] = directory
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    endpoint = _endpoint(settings, registry)
    try:
        yield directory
    finally:
        endpoint.close()
        if named is None:
            os.environ.pop(MULTIPROCESS_DIR, None)
            shutil.rmtree(directory, ignore_errors=True)


def worker_exited(directory: str | None, pid: int) -> None:
    """A worker is gone: its live gauges (calls in flight, its pool) leave the sums; its
    counters stay, so the totals never go down."""
    if directory is not None:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def _empty(directory: str) -> None:
    for stale in Path(directory).glob("*.db"):
        stale.unlink()
