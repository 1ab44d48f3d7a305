"""Request ids for tests: one definition, imported wherever a test needs a fresh one."""

from __future__ import annotations

import uuid


def rid() -> str:
    """A request_id no other test (nor the factories' `factory-opening-*`) will use."""
    return f"test-{uuid.uuid4().hex}"
