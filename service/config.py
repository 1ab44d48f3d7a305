"""Configuration: one Settings object, read once at start from SHOP_* variables and passed down."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class Settings(BaseSettings):
    """Every SHOP_* setting; the README has a table of them."""

    model_config = SettingsConfigDict(env_prefix="SHOP_", extra="ignore")

    # postgresql+asyncpg://user:password@host:port/db. Unset: an embedded PostgreSQL in data_dir.
    database_url: SecretStr | None = None
    data_dir: Path = Path(".data")

    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)

    pool_size: int = Field(default=10, ge=1)
    max_overflow: int = Field(default=20, ge=0)
    pool_timeout: float = Field(default=30.0, gt=0)
    pool_recycle: int = 3600
    pool_pre_ping: bool = True
    debug: bool = False  # echoes SQL

    log_format: LogFormat = LogFormat.TEXT
    log_level: str = "INFO"

    # Signs page tokens. Set it in production so tokens survive restarts and work across replicas.
    page_token_secret: SecretStr = SecretStr("dev-only-page-token-secret-change-me")

    # How long a request_id is remembered (see service/db/housekeeping.py).
    idempotency_retention_hours: float = Field(default=24.0, gt=0)

    # Seconds in-flight RPCs get to finish after SIGTERM/SIGINT.
    shutdown_grace: float = Field(default=10.0, ge=0)
