"""TLS and mutual TLS through a real server (start_server with its own Settings) and real
channels, with certificates made for the test in a temporary directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from shop.v1 import user_service_pb2, user_service_pb2_grpc

from service.config import Settings
from service.serving.server import RunningServer, start_server
from tests.certs import Certificates, make_certificates
from tests.rpc import rpc_fails


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path)


async def _started(settings: Settings, database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(settings, database_url)
    try:
        yield running
    finally:
        await running.stop(grace=None)


@pytest_asyncio.fixture
async def tls_server(certs: Certificates, database_url: str) -> AsyncIterator[RunningServer]:
    settings = Settings(grpc_port=0, tls_cert=certs.server.cert, tls_key=certs.server.key)
    async for running in _started(settings, database_url):
        yield running


@pytest_asyncio.fixture
async def mtls_server(certs: Certificates, database_url: str) -> AsyncIterator[RunningServer]:
    settings = Settings(
        grpc_port=0,
        tls_cert=certs.server.cert,
        tls_key=certs.server.key,
        tls_client_ca=certs.ca,
    )
    async for running in _started(settings, database_url):
        yield running


def _credentials(certs: Certificates, *, client_cert: bool) -> grpc.ChannelCredentials:
    if not client_cert:
        return grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=certs.client.key.read_bytes(),
        certificate_chain=certs.client.cert.read_bytes(),
    )


async def _create_user(channel: grpc.aio.Channel, email: str) -> user_service_pb2.User:
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    request = user_service_pb2.CreateUserRequest(email=email, first_name="T", last_name="LS")
    return await stub.CreateUser(request, timeout=10)


async def test_tls_call_succeeds_with_the_ca_as_root(
    tls_server: RunningServer, certs: Certificates
) -> None:
    address = f"127.0.0.1:{tls_server.port}"
    async with grpc.aio.secure_channel(address, _credentials(certs, client_cert=False)) as channel:
        user = await _create_user(channel, "tls@example.com")
    assert user.id > 0
    assert user.email == "tls@example.com"


async def test_plaintext_client_is_refused_by_a_tls_server(tls_server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_server.port}") as channel:
        failure = await rpc_fails(_create_user(channel, "plain@example.com"))
    assert failure.code == grpc.StatusCode.UNAVAILABLE


async def test_tls_client_trusting_another_ca_is_refused(
    tls_server: RunningServer, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    stranger = make_certificates(other, ca_name="some other CA")
    credentials = grpc.ssl_channel_credentials(root_certificates=stranger.ca.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{tls_server.port}", credentials) as channel:
        failure = await rpc_fails(_create_user(channel, "stranger@example.com"))
    assert failure.code == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_client_without_a_certificate(
    mtls_server: RunningServer, certs: Certificates
) -> None:
    address = f"127.0.0.1:{mtls_server.port}"
    async with grpc.aio.secure_channel(address, _credentials(certs, client_cert=False)) as channel:
        failure = await rpc_fails(_create_user(channel, "nocert@example.com"))
    assert failure.code == grpc.StatusCode.UNAVAILABLE


async def test_mtls_accepts_a_client_with_a_certificate(
    mtls_server: RunningServer, certs: Certificates
) -> None:
    address = f"127.0.0.1:{mtls_server.port}"
    async with grpc.aio.secure_channel(address, _credentials(certs, client_cert=True)) as channel:
        user = await _create_user(channel, "mtls@example.com")
    assert user.email == "mtls@example.com"


def test_tls_settings_must_come_as_a_pair(certs: Certificates) -> None:
    with pytest.raises(ValueError, match="SHOP_TLS_CERT and SHOP_TLS_KEY"):
        Settings(tls_cert=certs.server.cert)
    with pytest.raises(ValueError, match="SHOP_TLS_CLIENT_CA needs"):
        Settings(tls_client_ca=certs.ca)
