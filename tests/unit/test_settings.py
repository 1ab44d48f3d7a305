"""Settings keep secrets masked when printed, and reject malformed SHOP_AUTH_TOKENS."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from shop.v1 import account_service_pb2, order_service_pb2, user_service_pb2

from service.config import Settings
from service.serving.security import METHOD_ROLES, Role, TokenTable, is_loopback, required_role

SECRETS = ("s3cret-token", "pg-pass", "page-key")


def test_settings_print_with_secrets_masked() -> None:
    settings = Settings(
        auth_tokens="s3cret-token:write",
        database_url="postgresql+asyncpg://shop:pg-pass@db/shop",
        page_token_secret="page-key",
    )
    for shown in (repr(settings), str(settings), str(settings.safe_dump())):
        for secret in SECRETS:
            assert secret not in shown
    assert settings.safe_dump()["auth_tokens"] == "**********"
    assert settings.safe_dump()["grpc_port"] == 50051


def test_malformed_tokens_are_rejected_without_echoing_them() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(auth_tokens="s3cret-token:admin")
    assert "s3cret-token" not in str(caught.value)


def test_token_table_roles() -> None:
    table = TokenTable({"a": "read", "b:c": "write"})
    assert table.role_of("a") is Role.READ
    assert table.role_of("b:c") is Role.WRITE  # the role is after the last colon
    assert table.role_of("") is None
    assert table.role_of("A") is None


def test_every_shop_method_is_classified() -> None:
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in (user_service_pb2, order_service_pb2, account_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods == set(METHOD_ROLES)
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/shop.v1.UserService/Unknown") is Role.WRITE


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("example.com", False),
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
