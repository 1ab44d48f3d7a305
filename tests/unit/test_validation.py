"""Validation collects the violations (the first ten, and a count of the rest) before answering,
and refuses control and format characters in names and emails."""

from __future__ import annotations

import base64
import unicodedata

import pytest

from service.api.status import status_message
from service.api.validation import (
    _CONTROL,
    MAX_BATCH_SIZE,
    MAX_PAGE_SIZE,
    Violations,
    all_emails,
    all_names,
)
from service.errors import (
    MAX_DESCRIPTION_BYTES,
    MAX_FIELD_BYTES,
    MAX_SUMMARY_BYTES,
    MAX_VIOLATIONS,
    FieldViolation,
    InvalidArgument,
)


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


# --- The cap on violations ---------------------------------------------------------------------


def test_a_valid_request_adds_nothing() -> None:
    v = Violations()
    v.email("email", "ada@example.com")
    v.name("first_name", "Zoë Ångström")
    v.raise_if_any()
    assert (v.items, v.omitted, v.error()) == ([], 0, None)


def test_violations_keep_the_first_ten_and_count_the_rest() -> None:
    v = Violations()
    for i in range(2_000_000):
        v.add(f"update_mask[{i}]", "unknown path")
    with pytest.raises(InvalidArgument) as caught:
        v.raise_if_any()
    error = caught.value
    assert [item.field for item in error.violations] == [f"update_mask[{i}]" for i in range(10)]
    assert error.omitted == 1_999_990
    assert error.metadata == {"omitted_violations": "1999990"}
    assert error.message == (
        "invalid request: "
        + ", ".join(f"update_mask[{i}]" for i in range(10))
        + " and 1,999,990 more"
    )


def test_invalid_argument_caps_a_list_given_to_it() -> None:
    error = InvalidArgument([FieldViolation("users", "bad")] * 25)
    assert (len(error.violations), error.omitted) == (MAX_VIOLATIONS, 15)
    # A repeated field is named once.
    assert error.message == "invalid request: users and 15 more"


def test_long_fields_descriptions_and_messages_are_cut_on_character_boundaries() -> None:
    error = InvalidArgument([FieldViolation("f" * 1_000, "\U0001f600" * 1_000)])
    (violation,) = error.violations
    assert len(violation.field.encode()) <= MAX_FIELD_BYTES
    assert violation.field.endswith("...")
    assert len(violation.description.encode()) <= MAX_DESCRIPTION_BYTES
    assert violation.description == "\U0001f600" * 49 + "..."
    assert len(error.message.encode()) <= len("invalid request: ") + MAX_SUMMARY_BYTES


def _percent_encoded(message: str) -> str:
    """grpc-message as grpc sends it: bytes outside 0x20-0x7E, and %, as %XX."""
    return "".join(
        chr(b) if 0x20 <= b <= 0x7E and b != ord("%") else f"%{b:02X}" for b in message.encode()
    )


def test_the_largest_invalid_argument_fits_a_default_clients_metadata_limit() -> None:
    # The worst we can build: more violations than kept, every field and description longer
    # than kept and made of 4-byte characters (which also make grpc-message's percent-encoding
    # largest), the largest count.
    v = Violations()
    for i in range(2_000_000):
        v.add(f"{i}" + "\U0001f600" * 200, "\U0001f600" * 1_000)
    with pytest.raises(InvalidArgument) as caught:
        v.raise_if_any()
    status = status_message(caught.value)
    details = base64.b64encode(status.SerializeToString())
    message = _percent_encoded(status.message)
    # HPACK counts each entry as its name, its value and 32 bytes; grpc-status and the
    # x-request-id echo are the other trailers.
    trailers = (
        len("grpc-status-details-bin")
        + len(details)
        + 32
        + len("grpc-message")
        + len(message)
        + 32
        + len("grpc-status")
        + 1
        + 32
        + len("x-request-id")
        + 128
        + 32
    )
    print(f"worst INVALID_ARGUMENT: {trailers:,} bytes of trailing metadata")
    # 16 KiB is the hard limit; calls past the 8 KiB soft limit may fail too.
    assert trailers < 8 * 1024


# --- Control and format characters -------------------------------------------------------------

_REFUSED = {
    "U+202E right-to-left override": "\u202e",
    "U+200B zero width space": "\u200b",
    "U+FEFF byte order mark": "\ufeff",
    "U+00AD soft hyphen": "\xad",
    "U+0080 C1 control": "\x80",
    "U+0085 next line": "\x85",
    "U+009F C1 control": "\x9f",
    "U+2028 line separator": "\u2028",
    "U+2066 left-to-right isolate": "\u2066",
    "U+E0041 tag latin capital a": "\U000e0041",
    "tab": "\t",
    "NUL": "\x00",
    "DEL": "\x7f",
}


@pytest.mark.parametrize("char", _REFUSED.values(), ids=_REFUSED.keys())
def test_names_refuse_control_and_format_characters(char: str) -> None:
    v = Violations()
    v.name("first_name", f"Ada{char}Lovelace")
    assert [(i.field, i.description) for i in v.items] == [
        ("first_name", "must not hold control or format characters (such as U+202E)")
    ]
    assert not all_names([f"Ada{char}Lovelace"])
    assert not all_names(["Zoë", f"Ada{char}"])  # the non-ASCII column path too


@pytest.mark.parametrize("char", _REFUSED.values(), ids=_REFUSED.keys())
def test_emails_refuse_control_and_format_characters(char: str) -> None:
    v = Violations()
    v.email("email", f"ada{char}@example.com")
    assert [i.field for i in v.items] == ["email"]
    assert not all_emails([f"ada{char}@example.com"])
    assert not all_emails(["zoë@example.com", f"ada{char}@example.com"])


@pytest.mark.parametrize(
    "name", ["Zoë Ångström", "Ada Lovelace", "李小龍", "Ἀριστοτέλης", "محمد", "Zoë\u00a0Å", "🙂"]
)
def test_names_of_any_script_are_accepted(name: str) -> None:
    v = Violations()
    assert v.name("first_name", name) == name
    v.raise_if_any()
    assert all_names([name, "Ada"])


def test_the_refused_characters_are_unicodes_controls_formats_and_separators() -> None:
    # Against the running Python's Unicode database: every Cc, Cf, Zl and Zp character is
    # refused, and nothing else that Unicode assigns (the list may name format characters of
    # a later Unicode, which this one leaves unassigned).
    refused = {"Cc", "Cf", "Zl", "Zp"}
    for code_point in range(0x110000):
        char = chr(code_point)
        category = unicodedata.category(char)
        found = _CONTROL.search(char) is not None
        if category in refused:
            assert found, f"U+{code_point:04X} ({category}) is accepted"
        elif category != "Cn":
            assert not found, f"U+{code_point:04X} ({category}) is refused"
