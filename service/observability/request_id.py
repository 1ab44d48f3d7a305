"""The request id of the RPC being served: taken from `x-request-id` or generated, kept in a
context variable so that every log line written during the RPC can carry it."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from contextvars import ContextVar

HEADER = "x-request-id"

# A client's id is logged and echoed, so only a short, plain token is taken as it is; anything
# else (a newline, a megabyte) is replaced rather than trusted.
_ACCEPTABLE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

_current: ContextVar[str | None] = ContextVar("request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The client's x-request-id when it is acceptable, else a new one."""
    for key, value in metadata or ():
        if key == HEADER and isinstance(value, str) and _ACCEPTABLE.fullmatch(value):
            return value
    return new_request_id()


def current_request_id() -> str | None:
    """The id of the RPC this code runs for; None outside an RPC."""
    return _current.get()


def bind_request_id(request_id: str | None) -> None:
    """Set for the rest of this task: grpc.aio runs each RPC in a task of its own."""
    _current.set(request_id)
