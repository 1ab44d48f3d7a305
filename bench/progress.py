"""Progress lines while the benchmark runs: one per phase and step, with the elapsed time."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints `[  12.3s] phase: message` lines to stderr as the run goes."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, phase: str, message: str) -> None:
        print(f"[{self.elapsed:7.1f}s] {phase}: {message}", file=sys.stderr, flush=True)
