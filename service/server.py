"""Builds and runs the grpc.aio server: servicers, interceptors, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from shop.v1 import (
    account_service_pb2,
    account_service_pb2_grpc,
    order_service_pb2,
    order_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.config import Settings
from service.db.engine import create_engine, create_sessionmaker
from service.handlers.accounts import AccountServicer
from service.handlers.orders import OrderServicer
from service.handlers.paging import PageTokens
from service.handlers.users import UserServicer
from service.interceptors.errors import ErrorInterceptor
from service.interceptors.wrapping import Interceptor

log = logging.getLogger(__name__)

SHOP_SERVICES = (
    user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name,
    order_service_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name,
    account_service_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name,
)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass
class RunningServer:
    """A started server and what it owns."""

    server: grpc.aio.Server
    port: int
    health: HealthServicer
    engine: AsyncEngine

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.engine.dispose()


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """Channel arguments for grpc.aio.server (message sizes, keepalive, ...)."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]


def interceptors(settings: Settings) -> list[Interceptor]:
    """Outermost first. The error interceptor sits innermost, next to the servicers."""
    return [ErrorInterceptor()]


def add_shop_services(
    server: grpc.aio.Server, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    tokens = PageTokens(settings.page_token_secret.get_secret_value().encode())
    user_service_pb2_grpc.add_UserServiceServicer_to_server(UserServicer(sessions, tokens), server)
    order_service_pb2_grpc.add_OrderServiceServicer_to_server(
        OrderServicer(sessions, tokens), server
    )
    account_service_pb2_grpc.add_AccountServiceServicer_to_server(
        AccountServicer(sessions, tokens), server
    )


def bind(server: grpc.aio.Server, settings: Settings) -> int:
    """Listen on SHOP_GRPC_HOST:SHOP_GRPC_PORT; returns the bound port."""
    return server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")


async def start_server(settings: Settings, database_url: str) -> RunningServer:
    """Create the engine and the server, bind, start serving, report SERVING."""
    engine = create_engine(settings, database_url)
    server = grpc.aio.server(interceptors=interceptors(settings), options=server_options(settings))
    add_shop_services(server, create_sessionmaker(engine), settings)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SHOP_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = bind(server, settings)
    await server.start()
    for name in ("", *SHOP_SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving shop.v1 on %s:%d", settings.grpc_host, port)
    return RunningServer(server, port, health_servicer, engine)


async def serve(settings: Settings, database_url: str) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    running = await start_server(settings, database_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(asyncio.CancelledError):
        await stop.wait()
    log.info("shutting down (grace %.1fs)", settings.shutdown_grace)
    await running.stop(settings.shutdown_grace)
