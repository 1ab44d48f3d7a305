"""How bearer tokens are compared (serving/security.py): the README promises that timing says
nothing about a token. No clock can show that reliably on a shared machine, so this checks the
mechanism the promise rests on: every configured token is compared, always, with
hmac.compare_digest, on SHA-256 digests of one length whatever the token's length."""

from __future__ import annotations

import hmac

import pytest

from service.api.interceptors.auth import TokenTable
from service.api.methods import Role


@pytest.mark.parametrize("presented", ["", "r", "writer-token", "x" * 500, "reader-token"])
def test_every_token_is_compared_in_constant_time_on_equal_length_digests(
    monkeypatch: pytest.MonkeyPatch, presented: str
) -> None:
    table = TokenTable({"reader-token": "read", "writer-token": "write", "third": "read"})
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    role = table.role_of(presented)

    assert compared == [(32, 32)] * 3  # all three entries, matched or not, SHA-256 sized
    expected = {"reader-token": Role.READ, "writer-token": Role.WRITE}.get(presented)
    assert role == expected
