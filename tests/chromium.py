"""Headless Chromium for a test, driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: NUL-terminated JSON on fds 3 and 4), so the standard library is all
the driver needs. Not `--dump-dom` with `--virtual-time-budget`: virtual time runs on while a
response streams in, so the page's own deadline timers fired in a second of real time
(DEADLINE_EXCEEDED halfway through a StreamUsers of 2,500 rows)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests import tools

STOP_TIMEOUT = 10.0


class Chromium:
    """One browser process; `open()` loads a page in a new tab and `evaluate()` runs script in
    it. Every call waits at most until its deadline."""

    def __init__(self, process: subprocess.Popen[bytes], commands: int, replies: int) -> None:
        self.process = process
        self._commands = commands
        self._replies = replies
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None

    def send(self, method: str, timeout: float, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events that arrive meanwhile are dropped)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self._session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium exited ({self.process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return dict(json.loads(message))

    def open(self, url: str, timeout: float) -> None:
        target = self.send("Target.createTarget", timeout, url=url)["targetId"]
        attached = self.send("Target.attachToTarget", timeout, targetId=target, flatten=True)
        self._session = attached["sessionId"]

    def evaluate(self, expression: str, timeout: float) -> Any:
        result = self.send("Runtime.evaluate", timeout, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, interval: float = 0.2) -> Any:
        """Evaluates `expression` until it is truthy; its value. TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression, timeout=max(deadline - time.monotonic(), 1.0))
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout:.0f}s: {expression}")
            time.sleep(interval)


def _pipe() -> tuple[int, int]:
    """os.pipe(), both ends moved to fds of 10 or more."""
    ends = []
    for end in os.pipe():
        ends.append(fcntl.fcntl(end, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(end)
    return ends[0], ends[1]


@contextmanager
def chromium(profile: Path, log: Path) -> Iterator[Chromium]:
    """A headless Chromium with its own profile directory; stopped on exit."""
    binary = tools.require(tools.CHROMIUM)
    to_browser, commands = _pipe()
    replies, from_browser = _pipe()
    # bash moves the browser's ends to the fds the protocol fixes (3: commands in, 4: replies
    # out); they start at 10 or above, so neither is already 3 or 4 (and dash takes only 0-9).
    command = [
        "bash",
        "-c",
        f'exec "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-',
        "bash",
        binary,
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--remote-debugging-pipe",
        f"--user-data-dir={profile}",
        "about:blank",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, pass_fds=(to_browser, from_browser)
        )
    os.close(to_browser)
    os.close(from_browser)
    browser = Chromium(process, commands, replies)
    try:
        yield browser
    finally:
        # Gone already, or closed without a reply: the wait below settles it either way.
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            browser.send("Browser.close", timeout=STOP_TIMEOUT)
        os.close(commands)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
        os.close(replies)
