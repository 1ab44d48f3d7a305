"""Configuration: one Settings object, read once at start from SHOP_* variables and passed down."""

from __future__ import annotations

import os
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class Compression(StrEnum):
    NONE = "none"
    GZIP = "gzip"
    DEFLATE = "deflate"


# A PostgreSQL duration: digits and an optional unit; 0 turns the timeout off.
POSTGRES_DURATION = r"^[0-9]+(us|ms|s|min|h|d)?$"

# The page-token key a checkout runs with: it is public, so anyone can sign tokens with it.
# `serve` refuses it on a non-loopback address and warns on loopback (serving/security.py).
DEV_PAGE_TOKEN_SECRET = "dev-only-page-token-secret-change-me"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which a container's cpuset sets)."""
    return len(os.sched_getaffinity(0))


class Settings(BaseSettings):
    """Every SHOP_* setting; the README has a table of them."""

    # hide_input_in_errors: a bad value may be a secret (a token, a URL with a password).
    model_config = SettingsConfigDict(env_prefix="SHOP_", extra="ignore", hide_input_in_errors=True)

    # postgresql+asyncpg://user:password@host:port/db. Unset: an embedded PostgreSQL in data_dir.
    database_url: SecretStr | None = None
    data_dir: Path = Path(".data")

    # Read replicas (service/db/replicas.py; service/db/routing.py says which RPCs read there):
    # streaming standbys of SHOP_DATABASE_URL, comma-separated; empty: every read on the primary.
    database_replica_urls: SecretStr = SecretStr("")
    # A replica further behind than this (seconds) is skipped. 1 s: a standby streaming on the
    # same network replays within milliseconds, so one a whole second behind is stuck (replay
    # waiting out a recovery conflict, a saturated disk), not busy. Lower, and the clock skew
    # between the servers plus the first replay after an idle spell (replicas.py) would skip
    # healthy replicas now and then; higher, and a page may miss recent writes for longer.
    replica_max_lag: float = Field(default=1.0, gt=0)
    # How often each replica's lag is measured: a read's staleness is at most max lag plus this.
    replica_check_interval: float = Field(default=0.5, gt=0)
    # Each replica's pool: this many connections kept, as many more under load.
    replica_pool_size: int = Field(default=5, ge=1)

    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)

    pool_size: int = Field(default=10, ge=1)
    max_overflow: int = Field(default=20, ge=0)
    pool_timeout: float = Field(default=30.0, gt=0)
    pool_recycle: int = 3600
    pool_pre_ping: bool = True
    # Only connections idle this long are pinged on checkout (service/db/ping.py); 0 pings all.
    pool_pre_ping_idle: float = Field(default=1.0, ge=0)
    # SHOP_DATABASE_URL points at PgBouncer in transaction mode: no prepared-statement caches and
    # a unique name per prepared statement (service/db/engine.py; docs/reliability.md).
    pgbouncer: bool = False
    debug: bool = False  # echoes SQL

    log_format: LogFormat = LogFormat.TEXT
    log_level: str = "INFO"

    # Signs page tokens. Set it in production so tokens survive restarts and work across replicas.
    page_token_secret: SecretStr = SecretStr(DEV_PAGE_TOKEN_SECRET)

    # How long a request_id is remembered (see service/housekeeping.py).
    idempotency_retention_hours: float = Field(default=24.0, gt=0)

    # Seconds in-flight RPCs get to finish after SIGTERM/SIGINT.
    shutdown_grace: float = Field(default=10.0, ge=0)
    # Seconds between SIGTERM/SIGINT and refusing calls: health says NOT_SERVING while every RPC
    # is still served, so a balancer's health check moves traffic away before anything fails.
    # 5 s: Envoy checking every 1 s with unhealthy_threshold 2-3 notices within 3 s, plus slack
    # for a check in flight and the update reaching its workers. A second signal skips the rest.
    shutdown_drain_delay: float = Field(default=5.0, ge=0)

    # Serving processes sharing the port (service/serving/workers.py); each has its own pool,
    # group-commit writer and point-read coalescer. Default: one per core this process may use.
    workers: int = Field(default_factory=usable_cores, ge=1)
    # Run the event loop on uvloop (serving/workers.py): measured ~15-30% less CPU per GetUser.
    uvloop: bool = True

    # Migrations (alembic/env.py, docs/migrations.md): PostgreSQL durations such as "5s" or
    # "500ms", set on the migration connection before any DDL. The pattern keeps them safe to
    # render into the offline (--sql) script.
    migration_lock_timeout: str = Field(default="5s", pattern=POSTGRES_DURATION)
    migration_statement_timeout: str = Field(default="60s", pattern=POSTGRES_DURATION)
    # Serve even when the database's schema is behind this build (service/db/schema_state.py).
    allow_schema_behind: bool = False

    # Health (serving/health.py): ping the database every interval; NOT_SERVING when it fails.
    health_interval: float = Field(default=2.0, gt=0)
    health_timeout: float = Field(default=1.0, gt=0)

    # TLS (service/serving/tls.py): cert + key turn it on; a client CA makes it mutual TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    @model_validator(mode="after")
    def _tls_complete(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set SHOP_TLS_CERT and SHOP_TLS_KEY together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("SHOP_TLS_CLIENT_CA needs SHOP_TLS_CERT and SHOP_TLS_KEY")
        return self

    # Limits (service/serving/limits.py turns them into grpc.aio.server arguments).
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    keepalive_time_ms: int = Field(default=60_000, ge=1000)
    keepalive_timeout_ms: int = Field(default=20_000, ge=1000)
    keepalive_min_ping_interval_ms: int = Field(default=10_000, ge=0)
    max_concurrent_rpcs: int = Field(default=1000, ge=0)  # 0: no limit
    compression: Compression = Compression.NONE

    # Admission (service/api/interceptors/admission.py): health and reflection answer anyone, so
    # they have a budget of their own, apart from SHOP_MAX_CONCURRENT_RPCS (counted only once a
    # call is authenticated): strangers holding Watch or reflection streams never block a token
    # holder's call.
    max_public_rpcs: int = Field(default=32, ge=1)
    # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS advertised on every connection.
    max_streams_per_connection: int = Field(default=100, ge=1)
    # Seconds: a connection with no call for this long gets GOAWAY (0: never).
    max_connection_idle: float = Field(default=300.0, ge=0)
    # Seconds: a connection this old gets GOAWAY (clients reconnect, and a balancer spreads them
    # again), then calls still running on it get the grace before it is closed (0: never).
    max_connection_age: float = Field(default=1800.0, ge=0)
    max_connection_age_grace: float = Field(default=600.0, ge=0)

    # Streaming calls hold a database connection for as long as they run: an export (StreamUsers,
    # StreamOrders, StreamTransfers) its snapshot, ImportUsers its transaction. At most this many
    # at once per process, so unary calls always find a connection; one more is refused at once
    # with RESOURCE_EXHAUSTED. Unset: half the pool (SHOP_POOL_SIZE + SHOP_MAX_OVERFLOW), at
    # least 1 (stream_budget()): the other half is left to the unary calls, which hold theirs
    # for a statement or a batch.
    max_stream_connections: int | None = Field(default=None, ge=1)
    # Seconds a stream may wait on its peer: a reader that takes no message (or an ImportUsers
    # client that sends none) for this long ends with ABORTED / STREAM_STALLED (an export with
    # its resume token), and its connection and transaction are released.
    stream_stall_timeout: float = Field(default=60.0, gt=0)

    # The change feed (WatchChanges, docs/change-feed.md). Seconds between the polls of the
    # change log that every waiting watcher of a process shares (one query per interval while
    # any watches, none otherwise): the feed's added latency is at most this.
    changes_poll_interval: float = Field(default=0.05, gt=0)
    # Seconds: a watcher that got nothing for this long gets a heartbeat with a fresh token
    # (well inside a proxy's idle timeout: Envoy's stream_idle_timeout is 5 min).
    changes_heartbeat: float = Field(default=10.0, gt=0)
    # nats://host:port of a NATS server with JetStream: one serve process of the cluster (an
    # advisory lock elects it) relays every change there (service/serving/relay.py). Unset: off.
    # A secret: a NATS URL may carry a user and password.
    changes_nats_url: SecretStr | None = None
    # The JetStream stream the relay publishes to, created when missing on subjects
    # shop.changes.>; the lock is per stream, so one relay per cluster and stream.
    changes_nats_stream: str = Field(default="SHOP_CHANGES", pattern=r"^[A-Za-z0-9_-]+$")

    @model_validator(mode="after")
    def _relay_lock_holds(self) -> Settings:
        # PgBouncer in transaction mode hands a session's statements to any server connection:
        # the relay's session advisory lock would be taken on one and checked on another.
        if self.pgbouncer and self.nats_url() is not None:
            raise ValueError(
                "SHOP_CHANGES_NATS_URL needs a direct SHOP_DATABASE_URL, not PgBouncer"
            )
        return self

    # How long the change log keeps a change (`python -m service prune-changes` forgets older
    # ones), as an ISO 8601 duration (P7D, PT12H). A token older than this has expired.
    changes_retention: timedelta = Field(default=timedelta(days=7), gt=timedelta(0))

    # Security (service/serving/security.py): "token:role,token:role", role read or write.
    auth_tokens: SecretStr | None = None
    allow_insecure: bool = False  # serve a non-loopback address without tokens

    # Observability: Prometheus on metrics_host:metrics_port (0: off), OpenTelemetry if installed.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65535)
    otel_enabled: bool = False

    @field_validator("auth_tokens", mode="after")
    @classmethod
    def _tokens_well_formed(cls, value: SecretStr | None) -> SecretStr | None:
        # Blank is unset, here and only here: `auth_tokens is None` means auth is off, and
        # anything else is at least one well-formed pair.
        if value is None or not value.get_secret_value().strip():
            return None
        parse_token_roles(value.get_secret_value())
        return value

    @field_validator("page_token_secret", mode="after")
    @classmethod
    def _page_secret_not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("SHOP_PAGE_TOKEN_SECRET is empty: page tokens need a signing key")
        return value

    def stream_budget(self) -> int:
        """How many streaming calls may hold a connection at once (SHOP_MAX_STREAM_CONNECTIONS)."""
        return self.max_stream_connections or max(1, (self.pool_size + self.max_overflow) // 2)

    def nats_url(self) -> str | None:
        """SHOP_CHANGES_NATS_URL, None when unset or blank (the relay is off)."""
        url = "" if self.changes_nats_url is None else self.changes_nats_url.get_secret_value()
        return url.strip() or None

    def replica_urls(self) -> list[str]:
        """SHOP_DATABASE_REPLICA_URLS as a list (empty entries ignored)."""
        urls = self.database_replica_urls.get_secret_value().split(",")
        return [url.strip() for url in urls if url.strip()]

    def safe_dump(self) -> dict[str, Any]:
        """Every setting, secrets masked: fit for a log line."""
        return self.model_dump(mode="json")


def parse_token_roles(spec: str) -> dict[str, str]:
    """'tok1:read,tok2:write' -> {token: role}; raises ValueError without echoing a token."""
    roles: dict[str, str] = {}
    for number, pair in enumerate((p.strip() for p in spec.split(",")), start=1):
        if not pair:
            continue  # a stray comma ("a:read,"): nothing to misread
        token, _, role = pair.rpartition(":")
        if not token or role not in ("read", "write"):
            raise ValueError(f"SHOP_AUTH_TOKENS entry {number} is not token:read or token:write")
        roles[token] = role
    if not roles:
        raise ValueError("SHOP_AUTH_TOKENS holds no token:read or token:write pair")
    return roles
