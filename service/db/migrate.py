"""Run Alembic migrations from Python (`python -m service migrate`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    # Alembic's config is ConfigParser-backed: % must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    # The process has its logging set up already (observability/logs.py, or pytest's): alembic.ini's
    # would replace it, and `migrate` would lose its own lines (waiting for the lock, at head).
    config.attributes["configure_logger"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)
