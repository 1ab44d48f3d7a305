"""What the launchers (and the tests that start servers) need of processes and ports."""

from __future__ import annotations

import signal
import socket
import subprocess
import time


def free_port() -> int:
    """A port on 127.0.0.1 free right now, for servers that cannot be given port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM all at once, wait up to `timeout`, then SIGKILL what is left."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
