"""Server limits from Settings: message sizes, keepalive, streams per connection, connection
idle and age, and compression. How many calls run at once is admission's
(service/api/interceptors/admission.py)."""

from __future__ import annotations

from typing import Any

import grpc

from service.config import Compression, Settings

_COMPRESSION = {
    Compression.NONE: grpc.Compression.NoCompression,
    Compression.GZIP: grpc.Compression.Gzip,
    Compression.DEFLATE: grpc.Compression.Deflate,
}


def limit_options(settings: Settings) -> list[tuple[str, Any]]:
    """Channel arguments. A message past max_message_bytes fails with RESOURCE_EXHAUSTED."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Server pings find dead peers under long streams; a peer that does not answer within
        # the timeout is dropped and its calls cancelled.
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        # grpc core (1.85 here) waits for a ping's ack this long, not keepalive_timeout_ms:
        # without it a silent peer was dropped only after its one-minute default (measured
        # through a proxy that stops forwarding: tests/test_limits.py).
        ("grpc.http2.ping_timeout_ms", settings.keepalive_timeout_ms),
        # Clients pinging more often than this get GOAWAY (too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", settings.keepalive_min_ping_interval_ms),
        # Idle connections are kept healthy too, and clients may ping them.
        ("grpc.keepalive_permit_without_calls", 1),
        # SETTINGS_MAX_CONCURRENT_STREAMS: one connection cannot hold more streams than this
        # (a client's next stream waits for one to end); spreading past it costs a connection
        # each, and every call still counts against admission's budgets.
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        *_milliseconds("grpc.max_connection_idle_ms", settings.max_connection_idle),
        # grpc core jitters the age by +-10%, so connections opened together do not all get
        # GOAWAY at once.
        *_milliseconds("grpc.max_connection_age_ms", settings.max_connection_age),
        *_milliseconds("grpc.max_connection_age_grace_ms", settings.max_connection_age_grace),
    ]


def _milliseconds(option: str, seconds: float) -> list[tuple[str, int]]:
    """The option in milliseconds (at least 1), or none for 0: grpc's default, no limit."""
    return [(option, max(1, round(seconds * 1000)))] if seconds else []


def compression(settings: Settings) -> grpc.Compression:
    return _COMPRESSION[settings.compression]
