"""SHOP_WORKERS: serve from N processes that share the port (SO_REUSEPORT).

The workers are started with multiprocessing's "spawn": fresh interpreters, so no gRPC object,
thread or event loop of the parent is inherited (gRPC does not survive a fork once it runs).
Each builds its own server, engine and pool. The parent supervises: it forwards SIGTERM and
SIGINT, exits 0 when every worker stopped cleanly, and (with metrics on) serves the one /metrics
that adds up every worker's series (service/observability/metrics.py, multiprocess mode).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from service.config import Settings
from service.observability.logs import configure_logging
from service.observability.metrics import MULTIPROCESS_DIR, worker_exited, workers_metrics

log = logging.getLogger(__name__)


def run_event_loop(main: Coroutine[Any, Any, None], settings: Settings) -> None:
    """asyncio.run, on uvloop when SHOP_UVLOOP is on."""
    if settings.uvloop:
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def serve_processes(settings: Settings, database_url: str) -> int:
    """Serve until stopped; returns the exit status (0: every process stopped cleanly)."""
    from service.serving.server import serve  # imported here: the parent of N workers needs no gRPC

    if settings.workers == 1:
        os.environ.pop(MULTIPROCESS_DIR, None)  # one process serves its own /metrics
        run_event_loop(serve(settings, database_url), settings)
        return 0
    with _shared_port(settings) as port, workers_metrics(settings) as metrics_dir:
        return _supervise(
            settings.model_copy(update={"grpc_port": port}), database_url, metrics_dir
        )


@contextmanager
def _shared_port(settings: Settings) -> Iterator[int]:
    """The port the workers share. For SHOP_GRPC_PORT=0 the parent picks one and holds it (bound
    with SO_REUSEPORT, never listening, so it receives no connections) until the workers end."""
    if settings.grpc_port != 0:
        yield settings.grpc_port
        return
    with socket.socket(socket.AF_INET6 if ":" in settings.grpc_host else socket.AF_INET) as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((settings.grpc_host, 0))
        yield int(held.getsockname()[1])


def _stopped_while_starting(_signum: int, _frame: object) -> None:
    raise SystemExit(0)  # nothing served yet: stopping now is a clean stop


def _worker(settings: Settings, database_url: str) -> None:
    # Until serve() installs its own handlers, a forwarded SIGTERM must not kill with status -15.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped_while_starting)
    from service.serving.server import serve

    configure_logging(settings)
    log.info("worker %d starting", os.getpid())
    run_event_loop(serve(settings, database_url), settings)


def _supervise(settings: Settings, database_url: str, metrics_dir: str | None) -> int:
    spawn = multiprocessing.get_context("spawn")
    workers: list[BaseProcess] = [
        spawn.Process(target=_worker, args=(settings, database_url), name=f"shop-worker-{n}")
        for n in range(settings.workers)
    ]
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for worker in workers:
            worker.start()
        log.info("serving from %d workers on port %d", len(workers), settings.grpc_port)
        running = list(workers)
        while running:
            ended = wait([w.sentinel for w in running])
            for worker in [w for w in running if w.sentinel in ended]:
                worker.join()
                running.remove(worker)
                if worker.pid is not None:
                    worker_exited(metrics_dir, worker.pid)
                if worker.exitcode != 0 and not stopping:
                    # One worker down means fewer than N: stop all, let the supervisor restart.
                    log.error("worker %d exited with %s", worker.pid, worker.exitcode)
                    forward(signal.SIGTERM, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return next((abs(w.exitcode or 0) for w in workers if w.exitcode), 0)
