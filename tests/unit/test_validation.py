"""Validation collects every violation before answering."""

from __future__ import annotations

import pytest

from service.errors import InvalidArgument
from service.handlers.validation import MAX_BATCH_SIZE, MAX_PAGE_SIZE, Violations


def test_collects_all_violations() -> None:
    v = Violations()
    v.email("email", "not-an-email")
    v.name("first_name", "   ")
    v.name("last_name", "bad\x00name")
    v.amount("amount", "0")
    with pytest.raises(InvalidArgument) as caught:
        v.raise_if_any()
    fields = [violation.field for violation in caught.value.violations]
    assert fields == ["email", "first_name", "last_name", "amount"]


def test_email_is_lowercased() -> None:
    v = Violations()
    assert v.email("email", "Ada@Example.COM") == "ada@example.com"
    v.raise_if_any()


@pytest.mark.parametrize(
    ("given", "used"), [(0, 50), (1, 1), (MAX_PAGE_SIZE, MAX_PAGE_SIZE), (10_000, MAX_PAGE_SIZE)]
)
def test_page_size_defaults_and_caps(given: int, used: int) -> None:
    v = Violations()
    assert v.page_size("page_size", given) == used
    v.raise_if_any()


def test_negative_sizes_are_violations() -> None:
    v = Violations()
    v.page_size("page_size", -1)
    v.batch_size("batch_size", -5)
    with pytest.raises(InvalidArgument):
        v.raise_if_any()


def test_batch_size_caps() -> None:
    assert Violations().batch_size("batch_size", 0) == 500
    assert Violations().batch_size("batch_size", 10**6) == MAX_BATCH_SIZE
