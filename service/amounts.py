"""Exact money: decimal strings on the wire, Decimal in Python, NUMERIC(18, 2) in PostgreSQL."""

from __future__ import annotations

import re
from decimal import Decimal

CENT = Decimal("0.01")
# Unsigned, no exponent, at most 16 integer digits (NUMERIC(18, 2)) and 2 fractional digits.
# ASCII digits only: \d would also take other scripts' digits, such as "١٢".
_AMOUNT = re.compile(r"[0-9]{1,16}(\.[0-9]{1,2})?")


def parse_amount(text: str) -> Decimal | None:
    """The Decimal for a positive amount such as "12.50", or None when text is not one."""
    if not _AMOUNT.fullmatch(text):
        return None
    value = Decimal(text).quantize(CENT)
    return value if value > 0 else None


def format_money(value: Decimal) -> str:
    return str(value.quantize(CENT))
