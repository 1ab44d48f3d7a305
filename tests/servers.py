"""A server of a test's own, with its own Settings, on a free port, and a channel to it."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families
from shop.v1 import account_service_pb2_grpc, order_service_pb2_grpc, user_service_pb2_grpc

from deploy.processes import free_port as free_port  # one definition, re-exported
from service.config import Settings
from service.serving.server import RunningServer, start_server


@dataclass
class OwnServer:
    running: RunningServer
    channel: grpc.aio.Channel

    @property
    def users(self) -> user_service_pb2_grpc.UserServiceStub:
        return user_service_pb2_grpc.UserServiceStub(self.channel)

    @property
    def orders(self) -> order_service_pb2_grpc.OrderServiceStub:
        return order_service_pb2_grpc.OrderServiceStub(self.channel)

    @property
    def accounts(self) -> account_service_pb2_grpc.AccountServiceStub:
        return account_service_pb2_grpc.AccountServiceStub(self.channel)


@asynccontextmanager
async def own_server(database_url: str, **settings: Any) -> AsyncIterator[OwnServer]:
    """Start a server with these settings (a small pool; port 0), stop it on the way out."""
    defaults: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "pool_size": 2,
        "max_overflow": 0,
    }
    running = await start_server(Settings(**{**defaults, **settings}), database_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield OwnServer(running, channel)
    finally:
        await running.stop(grace=None)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(server: OwnServer) -> Samples:
    endpoint = server.running.metrics
    assert endpoint is not None
    return await scrape_port(endpoint.port)


async def scrape_port(port: int) -> Samples:
    """The samples /metrics on 127.0.0.1:`port` answers, by (name, labels)."""
    url = f"http://127.0.0.1:{port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    text = await asyncio.to_thread(fetch)  # the endpoint serves from its own thread
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def rpc(method: str, **labels: str) -> frozenset[tuple[str, str]]:
    service, name = method.split("/")
    return frozenset({"grpc_service": service, "grpc_method": name, **labels}.items())


async def wait_for_sample(
    server: OwnServer, key: tuple[str, frozenset[tuple[str, str]]], value: float
) -> bool:
    """Poll until the sample has the value: the server picks calls up on its own schedule."""
    for _ in range(200):
        if (await scrape(server)).get(key) == value:
            return True
        await asyncio.sleep(0.05)
    return False
