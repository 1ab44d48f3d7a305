"""Protobuf's wire format by hand, for tests that send requests no generated class would build
(millions of empty elements, fields the server must count before it parses them)."""

from __future__ import annotations


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a string or a message) on the wire."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload
