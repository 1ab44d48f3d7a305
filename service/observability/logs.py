"""Logging: readable lines in a terminal, one JSON object per line with SHOP_LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from service.config import LogFormat, Settings
from service.observability.request_id import current_request_id

# The attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the RPC it was written for ("-" outside RPCs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # request_id (from RequestIdFilter) and the access line's fields, as JSON values.
        entry.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)  # an odd extra must not lose the line


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s [%(request_id)s]: %(message)s")
        )
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
