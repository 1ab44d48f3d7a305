"""Request id, access log and INTERNAL errors through the shared server and a real channel."""

from __future__ import annotations

import json
import logging
from typing import Any, NoReturn

import grpc
import pytest
from shop.v1 import user_service_pb2 as api
from shop.v1.user_service_pb2_grpc import UserServiceStub
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from service.observability.logs import JsonFormatter, RequestIdFilter
from tests.factories import Factory
from tests.rpc import failure_of


def trailer(metadata: Any, key: str = "x-request-id") -> str | None:
    return next((value for k, value in metadata or () if k == key), None)


def access_lines(caplog: pytest.LogCaptureFixture, method: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "service.access" and getattr(r, "method", None) == method
    ]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture INFO and up, with the same request-id filter the service's handler has."""
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RequestIdFilter())
    return caplog


async def test_client_request_id_is_echoed_and_logged(
    user_stub: UserServiceStub, factory: Factory, logs: pytest.LogCaptureFixture
) -> None:
    user = await factory.user()
    call = user_stub.GetUser(api.GetUserRequest(id=user.id), metadata=[("x-request-id", "req-42")])
    await call
    assert trailer(await call.trailing_metadata()) == "req-42"

    [line] = access_lines(logs, "/shop.v1.UserService/GetUser")
    assert line.request_id == "req-42"  # type: ignore[attr-defined]
    assert line.code == "OK"  # type: ignore[attr-defined]
    assert line.peer.startswith("ipv4:127.0.0.1:")  # type: ignore[attr-defined]
    assert line.duration_ms >= 0  # type: ignore[attr-defined]
    entry = json.loads(JsonFormatter().format(line))
    assert entry["request_id"] == "req-42"
    assert entry["method"] == "/shop.v1.UserService/GetUser"
    assert entry["code"] == "OK"


async def test_request_id_is_generated_when_absent_or_unacceptable(
    user_stub: UserServiceStub, factory: Factory
) -> None:
    user = await factory.user()
    first = user_stub.GetUser(api.GetUserRequest(id=user.id))
    second = user_stub.GetUser(api.GetUserRequest(id=user.id))
    # Ids with spaces or of unbounded length are replaced rather than logged and echoed.
    spaced = user_stub.GetUser(api.GetUserRequest(id=user.id), metadata=[("x-request-id", "a b")])
    long = user_stub.GetUser(api.GetUserRequest(id=user.id), metadata=[("x-request-id", "x" * 200)])
    ids = [trailer(await c.trailing_metadata()) for c in (first, second, spaced, long)]
    assert all(ids) and len(set(ids)) == 4
    assert "a b" not in ids and "x" * 200 not in ids


async def test_errors_echo_request_id_and_stream_access_line_counts_messages(
    user_stub: UserServiceStub, factory: Factory, logs: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await user_stub.GetUser(api.GetUserRequest(id=999), metadata=[("x-request-id", "nf-1")])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert trailer(caught.value.trailing_metadata()) == "nf-1"
    assert failure_of(caught.value).reason == "USER_NOT_FOUND"  # rich details kept as well

    for n in range(5):
        await factory.user(email=f"s{n}@example.com")
    stream = user_stub.StreamUsers(api.StreamUsersRequest(batch_size=2))
    batches = [batch async for batch in stream]
    assert len(batches) == 3
    [line] = access_lines(logs, "/shop.v1.UserService/StreamUsers")
    assert line.messages_sent == 3  # type: ignore[attr-defined]
    assert line.code == "OK"  # type: ignore[attr-defined]
    [failed] = access_lines(logs, "/shop.v1.UserService/GetUser")
    assert failed.code == "NOT_FOUND"  # type: ignore[attr-defined]


async def test_internal_error_carries_request_id_and_hides_the_exception(
    user_stub: UserServiceStub, logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise sa_exc.ProgrammingError(
            "SELECT secret_column FROM users", {}, Exception('relation "x" does not exist')
        )

    monkeypatch.setattr(AsyncConnection, "execute", broken)  # what GetUser reads with
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await user_stub.GetUser(api.GetUserRequest(id=1), metadata=[("x-request-id", "boom-7")])

    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error (request id boom-7)"
    assert trailer(error.trailing_metadata()) == "boom-7"
    assert failure_of(error).reason == "INTERNAL"
    everything_sent = repr(error.details()) + repr(error.trailing_metadata())
    for leak in ("SELECT", "secret_column", "Traceback", "does not exist"):
        assert leak not in everything_sent

    # The stack trace is in the log, on a line bound to the same request id.
    [logged] = [r for r in logs.records if r.exc_info]
    assert logged.request_id == "boom-7"  # type: ignore[attr-defined]
    assert "secret_column" in logs.text
