"""Opaque, signed page tokens bound to the request's filters (keyset pagination)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping

from service.errors import InvalidArgument

_SIG_BYTES = 16
_MAX_KEY = 2**63 - 1  # BIGINT
# The tokens we issue are 91 characters at most (a 19-digit key); anything much longer is refused
# before it is decoded, and with it any payload deep enough to trouble json (a 100k-deep one
# raised RecursionError: INTERNAL).
MAX_TOKEN_LENGTH = 512


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
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidArgument.single(
                field,
                f"is longer than any token this service issues (at most {MAX_TOKEN_LENGTH})",
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
        key = data.get("k")
        # Keys are ids (BIGINT): a token outside that range was not issued here, even if signed
        # with our key (an old or leaked secret), and must not reach the query as an overflow.
        if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key <= _MAX_KEY:
            raise InvalidArgument.single(field, "is not a page token issued by this service")
        if data.get("f") != self._fingerprint(filters):
            raise InvalidArgument.single(field, "was issued for a request with other filters")
        return key

    def resume_after(self, token: str, filters: Mapping[str, object]) -> int:
        """The last key an export already sent, from a stream request's resume_token: 0 (from
        the start) without one; raises InvalidArgument on resume_token as decode() does."""
        return self.decode(token, filters, field="resume_token") if token else 0
