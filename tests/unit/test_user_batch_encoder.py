"""The compiled UserBatch encoder (service/api/_user_batch.c) writes upb's bytes: for any
rows, what user_rows_to_batch(rows, token).SerializeToString() gives, and they decode to the
same message. CI (CI set) must have built it: there a missing module fails instead of
skipping, so the fallback never ships silently."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shop.v1 import user_service_pb2 as api
from sqlalchemy.engine import result_tuple

from service.api import users_encode
from service.api.users_convert import user_rows_to_batch
from service.repositories.users import USER_COLUMNS

Encode = Callable[[Sequence[Any], str], bytes]
INT64 = st.integers(-(2**63), 2**63 - 1)
# Epoch microseconds: any int64 (seconds far beyond any calendar, negative included), and the
# years 1..9999 that PostgreSQL timestamps hold, where most of the weight should be.
MICROS = st.one_of(INT64, st.integers(-62_135_596_800 * 10**6, 253_402_300_799 * 10**6))
# Surrogates are not text hypothesis makes: neither encoder could write them as UTF-8.
TEXT = st.one_of(st.text(), st.text(min_size=100, max_size=2_000))
ROW = st.tuples(INT64, TEXT, TEXT, TEXT, st.booleans(), MICROS, MICROS, st.none() | MICROS)
# SQLAlchemy's Row, as exports stream them.
make_row = result_tuple([column.key for column in USER_COLUMNS])


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


@pytest.fixture(scope="module")
def encode() -> Encode:
    try:
        from service.api._user_batch import encode_user_batch
    except ImportError as exc:
        if _in_ci():
            pytest.fail(f"the compiled encoder was not built (make install builds it): {exc}")
        pytest.skip(f"the compiled encoder is not built here (no C compiler?): {exc}")
    return encode_user_batch


def upb(rows: Sequence[Any], token: str) -> bytes:
    return user_rows_to_batch(rows, token).SerializeToString()


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(ROW, max_size=20), token=TEXT)
def test_compiled_bytes_are_upbs(encode: Encode, rows: list[tuple[Any, ...]], token: str) -> None:
    encoded = encode(rows, token)
    assert encoded == upb(rows, token)
    assert api.UserBatch.FromString(encoded) == user_rows_to_batch(rows, token)


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(ROW, max_size=5), token=TEXT)
def test_rows_may_be_any_sequence(encode: Encode, rows: list[tuple[Any, ...]], token: str) -> None:
    expected = upb(rows, token)
    assert encode([make_row(row) for row in rows], token) == expected
    assert encode([list(row) for row in rows], token) == expected
    assert encode(tuple(rows), token) == expected


EPOCH = (1, "a@example.com", "Ada", "Lovelace", True, 0, 0, None)


@pytest.mark.parametrize(
    ("row", "error"),
    [
        (EPOCH[:7], ValueError),
        ((*EPOCH, None), ValueError),
        ((2**63, *EPOCH[1:]), OverflowError),
        ((1, None, *EPOCH[2:]), TypeError),
        ((1, b"a@example.com", *EPOCH[2:]), TypeError),
        ((*EPOCH[:5], 1.5, *EPOCH[6:]), TypeError),
        ((*EPOCH[:6], None, None), TypeError),
        ((*EPOCH[:7], 2**63), OverflowError),
        ((1, "\ud800", *EPOCH[2:]), UnicodeEncodeError),
        (42, TypeError),
    ],
)
def test_rows_it_cannot_encode_raise(encode: Encode, row: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        encode([EPOCH, row], "token")


def test_resume_token_must_be_text(encode: Encode) -> None:
    with pytest.raises(TypeError):
        encode([EPOCH], b"token")  # type: ignore[arg-type]


ROWS = [EPOCH, (2, "b@example.com", "Émile", "Zola", False, -1, 10**15, 10**15 + 1)]


def test_stream_users_yields_encoded_batches(encode: Encode) -> None:
    """What StreamUsers yields with the compiled encoder, and its response serializer sends."""
    assert users_encode.COMPILED
    batch = users_encode.encode_user_batch(ROWS, "next")
    assert isinstance(batch, users_encode.EncodedBatch)
    assert users_encode.serialize_user_batch(batch) == upb(ROWS, "next")


def test_stream_users_falls_back_to_upb(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the module is not built: messages, serialized by upb."""
    monkeypatch.setattr(users_encode, "_encode", None)
    batch = users_encode.encode_user_batch(ROWS, "next")
    assert batch == user_rows_to_batch(ROWS, "next")
    assert users_encode.serialize_user_batch(batch) == upb(ROWS, "next")
