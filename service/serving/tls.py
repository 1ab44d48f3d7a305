"""TLS for the listening port: SHOP_TLS_CERT + SHOP_TLS_KEY turn it on; SHOP_TLS_CLIENT_CA
also requires every client to present a certificate signed by that CA (mutual TLS)."""

from __future__ import annotations

import grpc

from service.config import Settings


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The port's credentials, or None for plaintext (no certificate configured)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    # Read once at start, like every other setting: a renewed certificate needs a restart.
    chain = settings.tls_cert.read_bytes()
    key = settings.tls_key.read_bytes()
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
