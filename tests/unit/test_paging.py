"""Page tokens are opaque, signed and bound to the filters they were issued for."""

from __future__ import annotations

import base64
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

import pytest

from service.api.paging import MAX_TOKEN_LENGTH, PageTokens
from service.errors import InvalidArgument

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


def signed_token(tokens: PageTokens, payload: bytes) -> str:
    """A token carrying `payload`, signed as `tokens` signs: what a holder of the secret (a
    leaked one, or the public dev default) could make."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(payload)}.{b64(tokens._sign(payload))}"


DEEP = b'{"k": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def test_issued_tokens_are_far_shorter_than_the_maximum() -> None:
    tokens = PageTokens(b"secret")
    longest = tokens.encode(2**63 - 1, {**FILTERS, "full_name": "x" * 201})
    assert len(longest) == 91
    assert 5 * len(longest) <= MAX_TOKEN_LENGTH


@pytest.mark.parametrize("field", ["page_token", "resume_token"])
def test_an_oversized_token_is_refused_before_it_is_decoded(field: str) -> None:
    tokens = PageTokens(b"secret")
    token = tokens.encode(42, FILTERS) + "A" * MAX_TOKEN_LENGTH
    with pytest.raises(InvalidArgument) as caught:
        tokens.decode(token, FILTERS, field=field)
    assert [v.field for v in caught.value.violations] == [field]
    assert "at most 512" in caught.value.violations[0].description


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_a_100k_deep_json_token_is_invalid_argument(signed: bool) -> None:
    # It raised RecursionError in json.loads (INTERNAL) once its signature checked out.
    tokens = PageTokens(b"secret")
    token = signed_token(tokens, DEEP) if signed else signed_token(PageTokens(b"other"), DEEP)
    with pytest.raises(InvalidArgument):
        tokens.decode(token, FILTERS)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"k": ' + b"[" * 150 + b"1" + b"]" * 150 + b', "f": "x"}',
        b'{"k": {"k": {"k": 1}}}',
        b'[{"k": 1}]',
    ],
)
def test_a_signed_token_that_nests_is_refused_unread(payload: bytes) -> None:
    tokens = PageTokens(b"secret")
    token = signed_token(tokens, payload)
    assert len(token) <= MAX_TOKEN_LENGTH
    with pytest.raises(InvalidArgument):
        tokens.decode(token, FILTERS)


@dataclass
class Row:
    id: int


@pytest.mark.parametrize(("found", "more"), [(3, False), (4, True)])
async def test_a_page_reads_one_row_more_than_it_returns(found: int, more: bool) -> None:
    tokens = PageTokens(b"secret")
    asked: list[tuple[int, int]] = []

    async def fetch(key: int, count: int) -> Sequence[Row]:
        asked.append((key, count))
        return [Row(key - i) for i in range(1, found + 1)]

    page, next_token = await tokens.page("", FILTERS, 3, fetch=fetch, start=100)
    assert asked == [(100, 4)]
    assert [r.id for r in page] == [99, 98, 97]
    assert (tokens.decode(next_token, FILTERS) if next_token else None) == (97 if more else None)


async def test_a_page_token_carries_on_from_its_key() -> None:
    tokens = PageTokens(b"secret")
    asked: list[int] = []

    async def fetch(key: int, count: int) -> Sequence[Row]:
        asked.append(key)
        return []

    assert await tokens.page(tokens.encode(7, FILTERS), FILTERS, 3, fetch=fetch) == ([], "")
    assert asked == [7]


async def test_an_export_closed_at_a_yield_closes_its_batches_now() -> None:
    tokens = PageTokens(b"secret")
    closed: list[int] = []

    async def batches(after: int) -> AsyncGenerator[list[Row], None]:
        try:
            yield [Row(after + 1), Row(after + 2)]
            yield [Row(after + 3)]
        finally:
            closed.append(after)

    messages = tokens.export(
        tokens.encode(10, {"export": "x"}),
        {"export": "x"},
        batches=batches,
        last_key=lambda rows: rows[-1].id,
        convert=lambda rows, token: (len(rows), tokens.resume_after(token, {"export": "x"})),
    )
    async with aclosing(messages):
        assert await anext(messages) == (2, 12)
    assert closed == [10]


async def test_an_export_refuses_a_page_token_as_its_resume_token() -> None:
    tokens = PageTokens(b"secret")

    async def batches(after: int) -> AsyncGenerator[list[Row], None]:
        yield [Row(after + 1)]

    messages = tokens.export(
        tokens.encode(10, FILTERS),
        {"export": "x", **FILTERS},
        batches=batches,
        last_key=lambda rows: rows[-1].id,
        convert=lambda rows, token: token,
    )
    with pytest.raises(InvalidArgument) as caught:
        await anext(messages)
    assert [v.field for v in caught.value.violations] == ["resume_token"]
