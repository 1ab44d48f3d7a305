"""Settings keep secrets masked when printed, reject malformed SHOP_AUTH_TOKENS and an empty
SHOP_PAGE_TOKEN_SECRET, and the exposure rules: what a non-loopback bind needs, what a start warns
about."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.api.interceptors.auth import TokenTable
from service.api.methods import METHOD_ROLES, Role, required_role
from service.config import DEV_PAGE_TOKEN_SECRET, Settings
from service.serving.security import (
    InsecureBindError,
    check_exposure,
    exposure_warnings,
    is_loopback,
)
from tests.rpc import SHOP_RPCS

SECRETS = ("s3cret-token", "pg-pass", "page-key", "nats-pass")


def test_settings_print_with_secrets_masked() -> None:
    settings = Settings(
        auth_tokens="s3cret-token:write",
        database_url="postgresql+asyncpg://shop:pg-pass@db/shop",
        page_token_secret="page-key",
        changes_nats_url="nats://relay:nats-pass@nats:4222",
    )
    for shown in (repr(settings), str(settings), str(settings.safe_dump())):
        for secret in SECRETS:
            assert secret not in shown
    assert settings.safe_dump()["auth_tokens"] == "**********"
    assert settings.safe_dump()["grpc_port"] == 50051


@pytest.mark.parametrize("url", ["", "  "])
def test_blank_nats_url_is_no_relay(url: str) -> None:
    assert Settings(changes_nats_url=url).nats_url() is None


def test_the_relay_refuses_pgbouncer() -> None:
    """Its session advisory lock would not stay on one server connection."""
    with pytest.raises(ValidationError, match="SHOP_CHANGES_NATS_URL"):
        Settings(pgbouncer=True, changes_nats_url="nats://127.0.0.1:4222")


@pytest.mark.parametrize(
    "tokens",
    [",", " , ", "s3cret-token", "s3cret-token:admin", ":read", "s3cret-token:read,:write"],
)
def test_malformed_tokens_are_rejected_without_echoing_them(tokens: str) -> None:
    with pytest.raises(ValidationError, match="SHOP_AUTH_TOKENS") as caught:
        Settings(auth_tokens=tokens)
    assert "s3cret-token" not in str(caught.value)


@pytest.mark.parametrize("tokens", ["", "  "])
def test_blank_tokens_are_unset(tokens: str) -> None:
    assert Settings(auth_tokens=tokens).auth_tokens is None
    assert TokenTable.from_settings(Settings(auth_tokens=tokens)) is None


def test_a_stray_comma_between_tokens_is_ignored() -> None:
    table = TokenTable.from_settings(Settings(auth_tokens="a:read,,b:write,"))
    assert table is not None
    assert (table.role_of("a"), table.role_of("b")) == (Role.READ, Role.WRITE)


@pytest.mark.parametrize("secret", ["", "   "])
def test_blank_page_token_secret_is_rejected(secret: str) -> None:
    with pytest.raises(ValidationError, match="SHOP_PAGE_TOKEN_SECRET"):
        Settings(page_token_secret=secret)


OWN_SECRET = "an-operator-s-own-secret"


@pytest.mark.parametrize(
    ("host", "tokens", "allow_insecure", "secret", "refused_for"),
    [
        ("127.0.0.1", None, False, DEV_PAGE_TOKEN_SECRET, []),
        ("0.0.0.0", "t:read", False, OWN_SECRET, []),
        ("0.0.0.0", None, True, OWN_SECRET, []),
        ("0.0.0.0", None, False, OWN_SECRET, ["SHOP_AUTH_TOKENS"]),
        ("0.0.0.0", "", False, OWN_SECRET, ["SHOP_AUTH_TOKENS"]),
        ("0.0.0.0", "t:read", False, DEV_PAGE_TOKEN_SECRET, ["SHOP_PAGE_TOKEN_SECRET"]),
        ("0.0.0.0", None, True, DEV_PAGE_TOKEN_SECRET, ["SHOP_PAGE_TOKEN_SECRET"]),
        (
            "10.0.0.5",
            None,
            False,
            DEV_PAGE_TOKEN_SECRET,
            ["SHOP_AUTH_TOKENS", "SHOP_PAGE_TOKEN_SECRET"],
        ),
    ],
)
def test_exposure_rules(
    host: str, tokens: str | None, allow_insecure: bool, secret: str, refused_for: list[str]
) -> None:
    settings = Settings(
        grpc_host=host, auth_tokens=tokens, allow_insecure=allow_insecure, page_token_secret=secret
    )
    if not refused_for:
        check_exposure(settings)
        return
    with pytest.raises(InsecureBindError) as caught:
        check_exposure(settings)
    for variable in refused_for:
        assert variable in str(caught.value)


@pytest.mark.parametrize(
    ("tokens", "secret", "warned_about"),
    [
        (None, DEV_PAGE_TOKEN_SECRET, ["SHOP_AUTH_TOKENS", "development page-token secret"]),
        ("", OWN_SECRET, ["SHOP_AUTH_TOKENS"]),
        ("t:read", DEV_PAGE_TOKEN_SECRET, ["development page-token secret"]),
        ("t:read", OWN_SECRET, []),
    ],
)
def test_exposure_warnings(tokens: str | None, secret: str, warned_about: list[str]) -> None:
    warnings = exposure_warnings(Settings(auth_tokens=tokens, page_token_secret=secret))
    assert len(warnings) == len(warned_about)
    for warning, topic in zip(warnings, warned_about, strict=True):
        assert topic in warning


def test_token_table_roles() -> None:
    table = TokenTable({"a": "read", "b:c": "write"})
    assert table.role_of("a") is Role.READ
    assert table.role_of("b:c") is Role.WRITE  # the role is after the last colon
    assert table.role_of("") is None
    assert table.role_of("A") is None


def test_every_shop_method_is_classified() -> None:
    methods = set(SHOP_RPCS)
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
