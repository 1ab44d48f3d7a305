"""The stop signals: the first starts the drain delay, a second cuts it short. What ends the
streams when the server stops is the gRPC room's (service/api/interceptors/shutdown.py)."""

from __future__ import annotations

import asyncio
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# With SHOP_WORKERS > 1 one Ctrl-C reaches a worker twice, a few milliseconds apart: from the
# terminal (the whole process group) and forwarded by the parent. A person's second Ctrl-C
# comes later than this.
REPEAT_AFTER = 0.3


class StopSignals:
    """SIGTERM and SIGINT on the running loop: `first` is set by the first of them, `again` by
    one at least REPEAT_AFTER seconds later (Ctrl-C twice skips the rest of the drain delay)."""

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self.again = asyncio.Event()
        self.name = ""
        self._first_at = 0.0

    def install(self) -> StopSignals:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._received, sig)
        return self

    def _received(self, sig: signal.Signals) -> None:
        now = asyncio.get_running_loop().time()
        if not self.first.is_set():
            self.name = sig.name
            self._first_at = now
            self.first.set()
        elif now - self._first_at >= REPEAT_AFTER:
            self.again.set()
