"""A request over 1 MiB is walked on the wire before protobuf parses it: refused past
MAX_ELEMENTS elements (naming the field), passed through unchanged otherwise, and refused as
malformed only where protobuf refuses it too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError
from shop.v1 import resources_pb2 as pb
from shop.v1 import user_service_pb2 as api

from service.api.interceptors.element_budget import MAX_ELEMENTS, SCAN_ABOVE_BYTES, bounded
from service.errors import InvalidArgument
from tests import wire


def _decoder(message_type: Any) -> Callable[[bytes], Any]:
    decode = bounded(message_type.FromString)
    assert decode is not None
    return decode


def _refused(message_type: Any, raw: bytes) -> dict[str, str]:
    assert len(raw) > SCAN_ABOVE_BYTES
    with pytest.raises(InvalidArgument) as caught:
        _decoder(message_type)(raw)
    return {v.field: v.description for v in caught.value.violations}


TOO_MANY = f"holds too many elements: at most {MAX_ELEMENTS:,} in a request"
MALFORMED = {"request": "is not a valid protobuf message"}


def test_large_valid_requests_parse_as_they_are() -> None:
    rows = [
        api.UpsertUser(email=f"user{i}@example.com", first_name="Ada" * 30, last_name="Z")
        for i in range(10_000)
    ]
    orders = [
        pb.Order(id=i, items=[pb.OrderItem(sku="A", quantity=1, unit_price="1.00")] * 3)
        for i in range(1_000)
    ]
    requests = [
        api.ImportUsersRequest(users=rows),
        api.UpdateUserRequest(
            user=pb.User(id=1, first_name="x" * SCAN_ABOVE_BYTES, orders=orders),
            update_mask={"paths": ["first_name"] * 100},
        ),
    ]
    for request in requests:
        raw = request.SerializeToString()
        assert len(raw) > SCAN_ABOVE_BYTES
        assert _decoder(type(request))(raw) == request


def test_exactly_max_elements_pass_and_one_more_is_refused() -> None:
    row = wire.field(1, wire.field(1, b"x" * 8))  # 12 bytes: 100,000 of them are over 1 MiB
    assert _decoder(api.UpsertUsersRequest)(row * MAX_ELEMENTS).users[-1].email == "x" * 8
    assert _refused(api.UpsertUsersRequest, row * (MAX_ELEMENTS + 1)) == {"users": TOO_MANY}


@pytest.mark.parametrize(
    ("message_type", "raw", "field"),
    [
        (api.UpdateUserRequest, wire.field(2, b"\x0a\x00" * 600_000), "update_mask.paths"),
        (api.UpdateUserRequest, wire.field(1, b"\x52\x00" * 600_000), "user.orders"),
        (
            api.UpdateUserRequest,
            wire.field(1, wire.field(10, b"\x22\x00" * 600_000)),
            "user.orders.items",
        ),
        (api.UpdateUserRequest, b"\x0a\x00" * 600_000, "user"),  # a message field, repeated
        (api.GetUserRequest, b"\xfa\x06\x00" * 600_000, "request"),  # an unknown field
        (api.GetUserRequest, b"\xfb\x06\xfc\x06" * 600_000, "request"),  # unknown groups
    ],
    ids=["paths", "orders", "items", "merged user", "unknown", "groups"],
)
def test_a_flood_is_refused_naming_its_field(message_type: Any, raw: bytes, field: str) -> None:
    assert _refused(message_type, raw) == {field: TOO_MANY}


def test_a_packed_number_field_counts_its_bytes() -> None:
    # None of our requests has one; a descriptor of protobuf's own does (int32 public_dependency).
    raw = wire.field(10, b"\x01" * (SCAN_ABOVE_BYTES + 1))
    assert _refused(descriptor_pb2.FileDescriptorProto, raw) == {"public_dependency": TOO_MANY}


def test_under_the_threshold_nothing_is_walked() -> None:
    raw = wire.field(2, b"\x0a\x00" * (SCAN_ABOVE_BYTES // 2 - 8))
    assert len(raw) <= SCAN_ABOVE_BYTES
    assert len(_decoder(api.UpdateUserRequest)(raw).update_mask.paths) > MAX_ELEMENTS


def _nested(depth: int) -> bytes:
    """A user's orders' user's orders ... `depth` messages deep, padded past the threshold."""
    inner = b""
    for level in reversed(range(1, depth)):
        inner = wire.field(10 if level % 2 else 8, inner)
    return wire.field(1, inner) + wire.field(2, wire.field(1, b"p" * SCAN_ABOVE_BYTES))


PADDING = wire.field(15, b"x" * SCAN_ABOVE_BYTES)  # an unknown field, to pass the threshold
MALFORMED_REQUESTS = {
    "length past the end": wire.field(1, b"") + PADDING + b"\x0a\xff\xff\x01",
    "field number 0": PADDING + b"\x02\x00",
    "wire type 6": PADDING + b"\x0e",
    "wire type 7": PADDING + b"\x0f",
    "end group unopened": PADDING + b"\x0c",
    "group unclosed": PADDING + b"\x0b\x10\x01",
    "group closed by another": PADDING + b"\x0b\x14",
    "varint unfinished": PADDING + b"\x08\xff",
    "fixed64 past the end": PADDING + b"\x09\x00",
    "nested past upb's depth": _nested(101),
}


@pytest.mark.parametrize("raw", MALFORMED_REQUESTS.values(), ids=MALFORMED_REQUESTS.keys())
def test_malformed_requests_are_refused_as_protobuf_refuses_them(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        api.UpdateUserRequest.FromString(raw)
    assert _refused(api.UpdateUserRequest, raw) == MALFORMED


def test_nesting_as_deep_as_upb_allows_parses() -> None:
    raw = _nested(100)
    assert _decoder(api.UpdateUserRequest)(raw) == api.UpdateUserRequest.FromString(raw)
