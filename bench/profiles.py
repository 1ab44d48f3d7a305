"""A readable summary of the service's cProfile output (`python -m bench --profile`)."""

from __future__ import annotations

import io
import pstats
from pathlib import Path


def write_summary(prof: Path, out: Path, top: int = 40) -> str:
    """The top functions by own time and by cumulative time; returns the file's name."""
    if not prof.exists():
        out.write_text("no profile: the service did not stop cleanly, so cProfile wrote nothing\n")
        return out.name
    text = io.StringIO()
    stats = pstats.Stats(str(prof), stream=text).strip_dirs()
    text.write("Service profile (main thread: the event loop, handlers, SQLAlchemy, asyncpg).\n")
    text.write("cProfile slows the service down; read the shares, not the absolute times.\n\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    out.write_text(text.getvalue())
    return out.name
