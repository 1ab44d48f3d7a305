"""A large request's elements counted on the wire before protobuf parses it.

Parsing is where a request's size turns into memory, before any handler can look at it: a
16 MiB request (SHOP_MAX_MESSAGE_BYTES) of 8.4M empty repeated elements, 2 bytes each, parses
into 256 MB of upb objects when they are strings (FieldMask.paths), 576-640 MB when they are
messages (BatchTransferRequest.requests, UpsertUsersRequest.users) and 897 MB for the orders of
an UpdateUserRequest's user (~107 bytes an element). So a request over SCAN_ABOVE_BYTES is
walked first, with its message's descriptor, and refused (INVALID_ARGUMENT, naming the field)
once it holds more than MAX_ELEMENTS elements. A smaller one is parsed at once: at most 524,288
elements, ~56 MB. Each handler's own bound (1000 users, 100 items, 100 paths, ...) then says
the exact limit, by len() before it reads the elements.

The walk visits the fields of messages that hold repeated or message fields, and counts a
message without them (UpsertUser, TransferRequest, OrderItem, Timestamp) as one element without
entering it. In pure Python it costs ~1-4 us an element, so it stops at MAX_ELEMENTS (well under
a second for the worst request), and the threshold keeps it off the usual requests: an
ImportUsers message of 1000 users is ~50 KB, a full UpsertUsers ~60 KB."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import Descriptor

from service.errors import InvalidArgument

SCAN_ABOVE_BYTES = 1024 * 1024
# Every per-call maximum is far below it (ImportUsers: 10,000 users per message); 100,000
# parsed elements are ~11 MB at the ~107 bytes an empty Order costs upb.
MAX_ELEMENTS = 100_000
# upb refuses messages nested deeper than this (its default recursion limit).
MAX_DEPTH = 100

Decode = Callable[[bytes], Any]

_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = range(6)


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    # The plan of its type when the walk must enter it (a type with repeated or message fields).
    plan: _Plan | None
    # A repeated number (int, enum, bool, float), which may come packed: a length-delimited
    # run of values, each taking at least a byte, so its length counts as that many elements.
    packable: bool


@dataclass(eq=False)
class _Plan:
    """The fields of one message type, by number."""

    fields: dict[int, _Field] = field(default_factory=dict)


def _needs_walk(descriptor: Descriptor, seen: dict[str, bool]) -> bool:
    name = descriptor.full_name
    if name not in seen:
        seen[name] = False  # a type that only holds itself holds nothing to count
        seen[name] = any(
            f.is_repeated or (f.message_type is not None and _needs_walk(f.message_type, seen))
            for f in descriptor.fields
        )
    return seen[name]


def _plan(descriptor: Descriptor, plans: dict[str, _Plan], walked: dict[str, bool]) -> _Plan:
    name = descriptor.full_name
    if name not in plans:
        plan = plans[name] = _Plan()
        for f in descriptor.fields:
            inner = f.message_type
            child = (
                _plan(inner, plans, walked)
                if inner is not None and _needs_walk(inner, walked)
                else None
            )
            packable = f.is_repeated and f.cpp_type not in (f.CPPTYPE_STRING, f.CPPTYPE_MESSAGE)
            plan.fields[f.number] = _Field(f.name, child, packable)
    return plans[name]


class _Malformed(Exception):
    """Bytes protobuf would refuse too."""


class _Walk:
    """One request's walk: MAX_ELEMENTS fields at most, then INVALID_ARGUMENT."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.budget = MAX_ELEMENTS

    def varint(self, pos: int) -> tuple[int, int]:
        raw, value, shift = self.raw, 0, 0
        while True:
            if shift > 63:
                raise _Malformed
            byte = raw[pos]  # IndexError past the end: malformed
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7

    def exhausted(self, path: str, field: _Field | None) -> InvalidArgument:
        where = ".".join(part for part in (path, field.name if field else "") if part)
        return InvalidArgument.single(
            where or "request", f"holds too many elements: at most {MAX_ELEMENTS:,} in a request"
        )

    def message(
        self, pos: int, end: int, plan: _Plan | None, path: str, depth: int, group: int = 0
    ) -> int:
        """Walk the fields in [pos, end), or up to the end tag of `group` (a group: an unknown
        field of proto2's wire format, which upb keeps as it keeps any unknown field); returns
        where the walk stopped. A message's known fields are named in the error."""
        if depth > MAX_DEPTH:
            raise _Malformed
        raw = self.raw
        fields = plan.fields if plan is not None else {}
        while pos < end:
            key = raw[pos]  # IndexError past the end: malformed
            pos += 1
            if key >= 0x80:  # one byte holds field numbers up to 15
                key, pos = self.varint(pos - 1)
            number, wire_type = key >> 3, key & 7
            if wire_type == _END_GROUP and group and number == group:
                return pos
            if number == 0 or wire_type == _END_GROUP:
                raise _Malformed
            self.budget -= 1
            if self.budget < 0:
                raise self.exhausted(path, fields.get(number))
            if wire_type == _LENGTH:
                length = raw[pos]
                pos += 1
                if length >= 0x80:
                    length, pos = self.varint(pos - 1)
                if pos + length > end:
                    raise _Malformed
                known = fields.get(number)
                if known is not None and known.plan is not None:
                    inner = f"{path}.{known.name}" if path else known.name
                    self.message(pos, pos + length, known.plan, inner, depth + 1)
                elif known is not None and known.packable:
                    self.budget -= length
                    if self.budget < 0:
                        raise self.exhausted(path, known)
                pos += length
            elif wire_type == _VARINT:
                _, pos = self.varint(pos)
            elif wire_type == _FIXED64:
                pos += 8
            elif wire_type == _FIXED32:
                pos += 4
            elif wire_type == _START_GROUP:
                pos = self.message(pos, end, None, path, depth + 1, group=number)
            else:
                raise _Malformed
        if group or pos != end:
            raise _Malformed
        return pos


def bounded(decode: Decode | None) -> Decode | None:
    """`decode` (a generated FromString), walking a request over SCAN_ABOVE_BYTES first."""
    descriptor = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
    if decode is None or not isinstance(descriptor, Descriptor):
        return decode
    plan = _plan(descriptor, {}, {})
    parse = decode

    def decode_bounded(raw: bytes) -> Any:
        if len(raw) > SCAN_ABOVE_BYTES:
            try:
                _Walk(raw).message(0, len(raw), plan, "", 0)
            except (_Malformed, IndexError) as exc:
                raise InvalidArgument.single("request", "is not a valid protobuf message") from exc
        return parse(raw)

    return decode_bounded
