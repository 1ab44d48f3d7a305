"""Money is parsed exactly from decimal strings and never goes through float."""

from __future__ import annotations

from decimal import Decimal

import pytest

from service.amounts import format_money, parse_amount


@pytest.mark.parametrize(
    ("text", "value"),
    [("12.50", "12.50"), ("0.01", "0.01"), ("7", "7.00"), ("1.5", "1.50"), ("9" * 16, "9" * 16)],
)
def test_valid_amounts(text: str, value: str) -> None:
    assert parse_amount(text) == Decimal(value)


@pytest.mark.parametrize(
    "text",
    ["", "0", "0.00", "-1", "+1", "1.234", "1e3", "abc", " 1", "1.", ".5", "1,00", "NaN", "9" * 17],
)
def test_invalid_amounts(text: str) -> None:
    assert parse_amount(text) is None


def test_sum_is_exact() -> None:
    total = sum(
        (parse_amount("0.10") or Decimal(0), parse_amount("0.20") or Decimal(0)), Decimal(0)
    )
    assert format_money(total) == "0.30"
