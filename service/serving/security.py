"""The rules that keep a server without tokens, or with the public page-token key, on loopback.
Who may call what (each RPC's role, the token table) is the gRPC room's: service/api/methods.py
and service/api/interceptors/auth.py."""

from __future__ import annotations

import ipaddress

from service.config import DEV_PAGE_TOKEN_SECRET, Settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


class InsecureBindError(RuntimeError):
    """A non-loopback address with no tokens (and no SHOP_ALLOW_INSECURE) or with the
    development page-token secret."""


def uses_dev_page_token_secret(settings: Settings) -> bool:
    return settings.page_token_secret.get_secret_value() == DEV_PAGE_TOKEN_SECRET


def check_exposure(settings: Settings) -> None:
    """Refuse to serve the network without authentication, or with page tokens anyone can sign."""
    if is_loopback(settings.grpc_host):
        return
    problems = []
    if settings.auth_tokens is None and not settings.allow_insecure:
        problems.append(
            "without SHOP_AUTH_TOKENS (set tokens, bind 127.0.0.1, or set SHOP_ALLOW_INSECURE=true)"
        )
    # SHOP_ALLOW_INSECURE opts out of tokens only: the development secret is in the repository,
    # and a new secret costs an operator one variable.
    if uses_dev_page_token_secret(settings):
        problems.append(
            "with the development page-token secret (set SHOP_PAGE_TOKEN_SECRET to a long random "
            "string, the same on every replica)"
        )
    if problems:
        raise InsecureBindError(f"refusing to serve {settings.grpc_host} " + " and ".join(problems))


def exposure_warnings(settings: Settings) -> list[str]:
    """What a server that check_exposure let through should say at start."""
    warnings = []
    if settings.auth_tokens is None:
        warnings.append("SHOP_AUTH_TOKENS is unset: every caller may read and write")
    if uses_dev_page_token_secret(settings):
        warnings.append(
            "the development page-token secret is in use: anyone can sign page tokens this "
            "server accepts; set SHOP_PAGE_TOKEN_SECRET"
        )
    return warnings
