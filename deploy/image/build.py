"""`make image`: the Dockerfile built by podman on this machine, on a local Debian base
(deploy/image/base.py), no Docker engine or registry needed.

    python -m deploy.image.build [--tag shop-service]

A Docker user builds the same Dockerfile on python:3.11-slim-bookworm: `docker build -t
shop-service .`.
"""

from __future__ import annotations

import argparse
import sys
import time

from deploy.image.base import base_image
from deploy.image.podman import ROOT, ImageError, podman

TAG = "localhost/shop-service"
# On a new base (no layer cached) podman build took 48 s here: apt-get for gcc, the locked
# wheels; 8-9 s with every layer cached.
BUILD_TIMEOUT = 1200.0


def build_image(tag: str = TAG) -> str:
    """Build the image from the repository's Dockerfile on the local base; its name."""
    base = base_image()
    print(f"podman build {tag} on {base}", flush=True)
    podman(
        [
            "build",
            "--format=docker",  # the Dockerfile's HEALTHCHECK: OCI images have none
            "--network=host",  # the builder's apt-get and pip reach what the host reaches
            f"--build-arg=PYTHON_IMAGE={base}",
            f"--tag={tag}",
            f"--file={ROOT / 'Dockerfile'}",
            str(ROOT),
        ],
        timeout=BUILD_TIMEOUT,
        capture=False,
    )
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.image.build", description=__doc__)
    parser.add_argument("--tag", default=TAG, help=f"the image's name (default {TAG})")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        build_image(args.tag)
    except ImageError as exc:
        print(f"image: {exc}", file=sys.stderr)
        return 1
    print(f"built {args.tag} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
