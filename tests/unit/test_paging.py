"""Page tokens are opaque, signed and bound to the filters they were issued for."""

from __future__ import annotations

import pytest

from service.errors import InvalidArgument
from service.handlers.paging import PageTokens

FILTERS = {"show_deleted": False, "full_name": "ada"}


def test_round_trip() -> None:
    tokens = PageTokens(b"secret")
    assert tokens.decode(tokens.encode(42, FILTERS), FILTERS) == 42


@pytest.mark.parametrize(
    "token",
    ["garbage", "a.b.c", "", ".", "eyJrIjogMX0.", "\x00\x01"],
)
def test_malformed_tokens_are_invalid_argument(token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        PageTokens(b"secret").decode(token, FILTERS)
    assert caught.value.violations[0].field == "page_token"


def test_tampered_token_is_refused() -> None:
    tokens = PageTokens(b"secret")
    payload, signature = tokens.encode(42, FILTERS).split(".")
    forged_payload = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
    with pytest.raises(InvalidArgument):
        tokens.decode(f"{forged_payload}.{signature}", FILTERS)


def test_token_from_another_secret_is_refused() -> None:
    token = PageTokens(b"other").encode(42, FILTERS)
    with pytest.raises(InvalidArgument):
        PageTokens(b"secret").decode(token, FILTERS)


def test_token_is_bound_to_its_filters() -> None:
    tokens = PageTokens(b"secret")
    token = tokens.encode(42, FILTERS)
    with pytest.raises(InvalidArgument) as caught:
        tokens.decode(token, {**FILTERS, "full_name": "bob"})
    assert "other filters" in caught.value.violations[0].description


@pytest.mark.parametrize("key", [-1, 2**63, -(2**63), 10**30, True])
def test_signed_token_with_a_key_outside_bigint_is_refused(key: int) -> None:
    # Found by tests/faults/test_fuzz.py: such a key reached the query and failed as INTERNAL.
    with pytest.raises(InvalidArgument):
        tokens = PageTokens(b"secret")
        tokens.decode(tokens.encode(key, FILTERS), FILTERS)
