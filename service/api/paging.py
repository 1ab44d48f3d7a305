"""Opaque, signed page tokens bound to the request's filters (keyset pagination)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any, Protocol, TypeVar

from service.errors import InvalidArgument

_SIG_BYTES = 16
_MAX_KEY = 2**63 - 1  # BIGINT
# The tokens we issue are 91 characters at most (a 19-digit key); anything much longer is refused
# before it is decoded, and with it any payload deep enough to trouble json (a 100k-deep one
# raised RecursionError: INTERNAL).
MAX_TOKEN_LENGTH = 512


class Keyed(Protocol):
    """A listed row: its id is the key a page is cut at."""

    @property
    def id(self) -> int: ...


K = TypeVar("K", bound=Keyed)
B = TypeVar("B")  # an export's batch, as the application yields it
M = TypeVar("M")  # the message a batch goes on the wire as


def last_id(rows: Sequence[Any]) -> int:
    """The key of a batch of rows: its last row's id."""
    key: int = rows[-1].id
    return key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    """Encodes the last key of a page; a token only decodes for the filters it was made with."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:_SIG_BYTES]

    @staticmethod
    def _fingerprint(filters: Mapping[str, object]) -> str:
        canonical = json.dumps(filters, sort_keys=True, default=str).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]

    def encode(self, last_key: int, filters: Mapping[str, object]) -> str:
        return self.encoder(filters)(last_key)

    def encoder(self, filters: Mapping[str, object]) -> Callable[[int], str]:
        """encode() for one request's filters, fingerprinted once: an export makes a token for
        every batch it sends."""
        fingerprint = self._fingerprint(filters)

        def encode(last_key: int) -> str:
            payload = json.dumps({"k": last_key, "f": fingerprint}).encode()
            return f"{_b64(payload)}.{_b64(self._sign(payload))}"

        return encode

    def decode(self, token: str, filters: Mapping[str, object], field: str = "page_token") -> int:
        """The last key of the previous page; raises InvalidArgument for a forged, corrupt,
        foreign or oversized token."""
        data = self._open(token, filters, field, MAX_TOKEN_LENGTH)
        key = data.get("k")
        # Keys are ids (BIGINT): a token outside that range was not issued here, even if signed
        # with our key (an old or leaked secret), and must not reach the query as an overflow.
        if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key <= _MAX_KEY:
            raise InvalidArgument.single(field, "is not a page token issued by this service")
        return key

    def seal(self, fields: Mapping[str, str | int], filters: Mapping[str, object]) -> str:
        """A token carrying flat `fields` (strings and ints; a change feed's position), bound
        to the request's filters like a page token."""
        payload = json.dumps({**fields, "f": self._fingerprint(filters)}).encode()
        return f"{_b64(payload)}.{_b64(self._sign(payload))}"

    def unseal(
        self, token: str, filters: Mapping[str, object], field: str, max_length: int
    ) -> dict[str, Any]:
        """The fields of a sealed token; InvalidArgument as decode() raises it."""
        return self._open(token, filters, field, max_length)

    def _open(
        self, token: str, filters: Mapping[str, object], field: str, max_length: int
    ) -> dict[str, Any]:
        if len(token) > max_length:
            raise InvalidArgument.single(
                field, f"is longer than any token this service issues (at most {max_length})"
            )
        try:
            payload_text, sig_text = token.split(".")
            payload = _unb64(payload_text)
            valid = hmac.compare_digest(self._sign(payload), _unb64(sig_text))
            # Ours is one flat object: a signed payload that nests (signed with a leaked or the
            # dev secret) is refused unread.
            flat = payload.count(b"{") == 1 and b"[" not in payload
            data = json.loads(payload) if valid and flat else None
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):
            raise InvalidArgument.single(field, "is not a page token issued by this service")
        if data.get("f") != self._fingerprint(filters):
            raise InvalidArgument.single(field, "was issued for a request with other filters")
        return data

    def resume_after(self, token: str, filters: Mapping[str, object]) -> int:
        """The last key an export already sent, from a stream request's resume_token: 0 (from
        the start) without one; raises InvalidArgument on resume_token as decode() does."""
        return self.decode(token, filters, field="resume_token") if token else 0

    async def page(
        self,
        token: str,
        filters: Mapping[str, object],
        limit: int,
        *,
        fetch: Callable[[int, int], Awaitable[Sequence[K]]],
        start: int = 0,
    ) -> tuple[Sequence[K], str]:
        """A page of a keyset listing and the next page's token ("" after the last page).

        fetch(key, count) reads up to count rows past key: the key the page token carries, or
        `start` without one (0 for ascending ids, MAX_ID for descending). One row more than the
        page is read; it only says whether another page follows."""
        key = self.decode(token, filters) if token else start
        rows = await fetch(key, limit + 1)
        page = rows[:limit]
        return page, self.encode(page[-1].id, filters) if len(rows) > limit else ""

    async def export(
        self,
        token: str,
        filters: Mapping[str, object],
        *,
        batches: Callable[[int], AsyncGenerator[B, None]],
        last_key: Callable[[B], int],
        convert: Callable[[B, str], M],
    ) -> AsyncGenerator[M, None]:
        """An export's messages: batches(after), from the key the resume token carries (0
        without one), each batch converted with the resume token of its last key.

        Close it (aclosing): that closes the application's generator, and with it the snapshot,
        even when the call ends at a yield. The work added is per batch, never per row."""
        after = self.resume_after(token, filters)
        resume_token = self.encoder(filters)
        rows = batches(after)
        async with aclosing(rows):
            async for batch in rows:
                yield convert(batch, resume_token(last_key(batch)))
