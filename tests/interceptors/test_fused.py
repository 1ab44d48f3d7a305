"""Wrapping interceptors fused into one (service/api/interceptors/wrapping.py) behave as the
same interceptors installed one by one: through a real grpc.aio server, each layer runs in the
same order around the handler, and a layer with per-call work of its own stays apart."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from service.api.context import Context
from service.api.interceptors.shutdown import ActiveStreams
from service.api.interceptors.wrapping import (
    Fused,
    Handler,
    Interceptor,
    WrappingInterceptor,
    fused,
    with_behaviours,
)
from service.config import Settings
from service.serving.server import interceptors
from tests.servers import free_port

SERVICE = "test.Fused"


class Layer(WrappingInterceptor):
    """Logs its name on the way in and on the way out of each unary call."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def wrap(self, method: str, handler: Handler) -> Handler:
        def unary(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def call(request: Any, context: Context) -> Any:
                self.log.append(f"{self.name}>")
                try:
                    return await fn(request, context)
                finally:
                    self.log.append(f"<{self.name}")

            return call

        return with_behaviours(handler, unary, lambda fn: fn)


async def _calls(chain: list[Interceptor], log: list[str]) -> list[str]:
    """What `log` holds after two calls through a server with `chain`."""

    async def echo(request: bytes, context: Any) -> bytes:
        log.append("handler")
        return request

    server = grpc.aio.server(interceptors=chain)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            ),
        )
    )
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = channel.unary_unary(f"/{SERVICE}/Echo")
            for _ in range(2):
                assert await method(b"x", timeout=5) == b"x"
    finally:
        await server.stop(None)
    return log


async def test_fused_layers_run_in_the_order_they_ran_one_by_one() -> None:
    apart: list[str] = []
    await _calls([Layer(n, apart) for n in "abc"], apart)
    together: list[str] = []
    chain = fused([Layer(n, together) for n in "abc"])
    assert [type(i) for i in chain] == [Fused]
    await _calls(chain, together)
    assert together == apart == ["a>", "b>", "c>", "handler", "<c", "<b", "<a"] * 2


def test_the_service_chain_fuses_all_but_the_layer_with_work_per_call() -> None:
    streams = ActiveStreams()
    chain = fused([Layer("outer", []), *interceptors(Settings()), streams])
    assert [type(i) for i in chain] == [Fused, ActiveStreams]
    assert chain[1] is streams
