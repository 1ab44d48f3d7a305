"""podman as `make image` and `make image-smoke` run it: with deploy/image/containers.conf
(CONTAINERS_CONF), every call bounded by a timeout."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONTAINERS_CONF = HERE / "containers.conf"


class ImageError(RuntimeError):
    """A step of building or checking the image failed."""


def executable(name: str) -> str:
    """`name` on PATH or in /usr/sbin (debootstrap lives there, not always on a user's PATH)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        raise ImageError(f"{name} not found: install Debian's podman, runc and debootstrap")
    return path


def podman(
    args: Sequence[str],
    timeout: float,
    *,
    check: bool = True,
    capture: bool = True,
    stdin: IO[bytes] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `podman args...`; raise ImageError when it fails (check) or outlives `timeout`.

    With capture=False the output goes to ours (the build's steps, as they happen)."""
    command = [executable("podman"), *args]
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))
    try:
        done = subprocess.run(
            command,
            env=env,
            stdin=stdin,
            timeout=timeout,
            text=True,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"podman {args[0]} took over {timeout:.0f} s") from exc
    if check and done.returncode != 0:
        detail = (done.stderr or "").strip()[-2000:]
        raise ImageError(f"podman {' '.join(args[:2])} exited {done.returncode}: {detail}")
    return done
