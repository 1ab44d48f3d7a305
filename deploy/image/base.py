"""The image's base where no registry answers: a Debian bookworm root filesystem made by
debootstrap, imported into podman as a local image that the Dockerfile takes as PYTHON_IMAGE.

Debian's python3 (3.11) stands in for python:3.11-slim-bookworm: python3-venv for the venv,
python-is-python3 for the Dockerfile's `python`, libpython3.11-dev for the compiled encoder's
headers (without them setup.py's optional extension is skipped). The root filesystem is cached
(SHOP_IMAGE_CACHE, /var/cache/shop-image): debootstrap took 51-63 s here, the import 7 s.

What pip inside the build needs of this host goes into the base, never into the repository:
the host's CA bundle (an egress proxy may re-sign TLS) and the part of its pip configuration a
container can use (index URLs, trusted hosts, timeouts; not file:// indexes, find-links or
constraints, which name this host's disk), as /etc/pip.conf. Both are part of the base's tag, so
a change on the host makes a new base.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from deploy.image.podman import ImageError, executable, podman

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "python-is-python3", "libpython3.11-dev", "ca-certificates")
MIRROR = os.environ.get("SHOP_IMAGE_MIRROR", "http://deb.debian.org/debian")
CACHE = Path(os.environ.get("SHOP_IMAGE_CACHE", "/var/cache/shop-image"))
REPOSITORY = "localhost/shop-service-base"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PIP_CA = "/etc/ssl/certs/pip-ca.crt"  # in the base: the bundle the host's pip trusts
DEBOOTSTRAP_TIMEOUT = 900.0  # 51-63 s here
IMPORT_TIMEOUT = 300.0
# The host's pip settings that mean the same inside a container.
PIP_KEYS = ("index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout", "retries")


def host_pip_settings() -> dict[str, str]:
    """The host's pip configuration (files and PIP_* variables, as `pip config list` merges
    them), keyed by option name."""
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        name, sep, raw = line.partition("=")
        if not sep:
            continue
        value = ast.literal_eval(raw)  # pip prints repr()s: 'value'
        # global.x, install.x, :env:.x: later lines (the environment) win, as in pip.
        settings[name.rpartition(".")[2]] = str(value)
    return settings


def container_pip_conf(settings: dict[str, str], has_cert: bool) -> str:
    """/etc/pip.conf for the base: what of `settings` a container can use."""
    lines = ["# From the pip configuration of the host that made this base (deploy/image/base.py)."]
    lines.append("[global]")
    if has_cert:
        lines.append(f"cert = {PIP_CA}")
    for key in PIP_KEYS:
        if key not in settings:
            continue
        # A file:// index is a directory of the host: not there in the build.
        kept = [item for item in settings[key].split() if not item.startswith("file:")]
        if kept:
            lines.append(f"{key} = {' '.join(kept)}")
    return "\n".join(lines) + "\n"


def pip_ca_bundle(settings: dict[str, str]) -> Path | None:
    """The CA bundle the host's pip trusts: its `cert` setting, else the system bundle."""
    cert = Path(settings["cert"]) if "cert" in settings else HOST_CA_BUNDLE
    return cert if cert.is_file() else None


def digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(hashlib.sha256(part).digest())
    return hasher.hexdigest()[:16]


def rootfs() -> Path:
    """The debootstrapped root filesystem, from the cache when an earlier run made it."""
    key = digest(SUITE.encode(), MIRROR.encode(), " ".join(PACKAGES).encode())
    target = CACHE / f"rootfs-{SUITE}-{key}"
    if (target / "etc" / "debian_version").is_file():
        return target
    partial = CACHE / f"rootfs-{SUITE}-{key}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted run's leftovers
    CACHE.mkdir(parents=True, exist_ok=True)
    command = [
        executable("debootstrap"),
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(partial),
        MIRROR,
    ]
    print(f"debootstrap {SUITE} into {partial} (cached for later runs)", flush=True)
    started = time.monotonic()
    try:
        subprocess.run(command, timeout=DEBOOTSTRAP_TIMEOUT, check=True, stdout=subprocess.DEVNULL)
    except (subprocess.SubprocessError, OSError) as exc:
        log = partial / "debootstrap" / "debootstrap.log"
        tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
        raise ImageError(f"debootstrap failed: {exc}\n{tail}") from exc
    shutil.rmtree(partial / "var" / "lib" / "apt" / "lists", ignore_errors=True)
    (partial / "var" / "lib" / "apt" / "lists" / "partial").mkdir(parents=True)
    partial.rename(target)
    print(f"debootstrap: {time.monotonic() - started:.0f} s", flush=True)
    return target


def base_image() -> str:
    """The local base image (made and imported unless this host already has it): its name."""
    settings = host_pip_settings()
    ca = pip_ca_bundle(settings)
    ca_bytes = ca.read_bytes() if ca is not None else b""
    pip_conf = container_pip_conf(settings, has_cert=ca is not None)
    system_ca = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.is_file() else b""
    tree = rootfs()
    tag = digest(tree.name.encode(), system_ca, ca_bytes, pip_conf.encode())
    name = f"{REPOSITORY}:{tag}"
    if podman(["image", "exists", name], timeout=60, check=False).returncode == 0:
        return name
    if system_ca:  # what Python's ssl trusts by default, as on the host
        (tree / HOST_CA_BUNDLE.relative_to("/")).write_bytes(system_ca)
    if ca_bytes:
        (tree / PIP_CA.lstrip("/")).write_bytes(ca_bytes)
    (tree / "etc" / "pip.conf").write_text(pip_conf)
    print(f"importing {tree} as {name}", flush=True)
    started = time.monotonic()
    tar = subprocess.Popen(["tar", "-C", str(tree), "-c", "."], stdout=subprocess.PIPE)
    try:
        podman(["import", "-", name], timeout=IMPORT_TIMEOUT, stdin=tar.stdout)
    finally:
        if tar.stdout is not None:
            tar.stdout.close()
        tar.wait(timeout=IMPORT_TIMEOUT)
    if tar.returncode != 0:
        raise ImageError(f"tar of {tree} exited {tar.returncode}")
    print(f"import: {time.monotonic() - started:.0f} s", flush=True)
    return name
