"""Three "hosts" on this machine: network namespaces joined to the root namespace by one bridge.

    root namespace: bridge shmh<pid>br  10.203.N.1/24  (PostgreSQL and Envoy's clusters use it)
      ├─ veth shmh<pid>h1 ── shmh<pid>n1 in netns shmh-<pid>-1  10.203.N.11
      ├─ veth shmh<pid>h2 ── shmh<pid>n2 in netns shmh-<pid>-2  10.203.N.12
      └─ veth shmh<pid>h3 ── shmh<pid>n3 in netns shmh-<pid>-3  10.203.N.13

Names carry the pid of the test process, so two runs never share a namespace, and a later run
removes what a crashed one left (its pid no longer alive). N is the first 10.203.N.0/24 that no
interface of this machine uses. Needs root and iproute2's `ip`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

PREFIX = "shmh"
SUBNETS = "10.203.{}.0/24"
_OWNED = re.compile(rf"^{PREFIX}-?(\d+)")


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Host:
    """One namespace: its name (for `ip netns exec`) and its address on the bridge."""

    netns: str
    address: str

    def command(self, *argv: str) -> list[str]:
        """argv run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclass(frozen=True)
class Network:
    """The bridge's address (the root namespace as seen from the hosts) and the hosts."""

    bridge: str
    gateway: str
    subnet: str
    hosts: list[Host]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_namespace(name: str) -> None:
    """Kill whatever still runs in it, then delete it (its veth ends go with it)."""
    for pid in ip("netns", "pids", name, check=False).split():
        with suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    ip("netns", "delete", name, check=False)


def remove_leftovers() -> None:
    """Namespaces and links of earlier runs whose test process is gone."""
    for line in ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        owner = _OWNED.match(name)
        if owner and not _alive(int(owner.group(1))):
            _remove_namespace(name)
    for line in ip("-o", "link", "show", check=False).splitlines():
        fields = line.split(":")
        name = fields[1].strip().split("@")[0] if len(fields) > 1 else ""
        owner = _OWNED.match(name)
        if owner and not _alive(int(owner.group(1))):
            ip("link", "delete", name, check=False)


def free_subnet() -> ipaddress.IPv4Network:
    """The first 10.203.N.0/24 that no address of this machine falls in."""
    used = [
        ipaddress.ip_interface(word).network
        for word in ip("-4", "-o", "addr", "show").split()
        if re.fullmatch(r"\d+\.\d+\.\d+\.\d+/\d+", word)
    ]
    start = os.getpid() % 200 + 1
    for n in [*range(start, 255), *range(1, start)]:
        subnet = ipaddress.ip_network(SUBNETS.format(n))
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise RuntimeError("no free 10.203.N.0/24 on this machine")


@contextmanager
def network(count: int = 3) -> Iterator[Network]:
    """Build the bridge and `count` namespaces; tear all of it down on the way out."""
    remove_leftovers()
    run = str(os.getpid())
    bridge = f"{PREFIX}{run}br"
    subnet = free_subnet()
    gateway = str(subnet.network_address + 1)
    namespaces: list[str] = []
    links: list[str] = []
    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", bridge)
        ip("link", "set", bridge, "up")
        hosts = []
        for i in range(1, count + 1):
            netns, outside, inside = (
                f"{PREFIX}-{run}-{i}",
                f"{PREFIX}{run}h{i}",
                f"{PREFIX}{run}n{i}",
            )
            address = str(subnet.network_address + 10 + i)
            ip("netns", "add", netns)
            namespaces.append(netns)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            links.append(outside)
            ip("link", "set", inside, "netns", netns)
            ip("link", "set", outside, "master", bridge)
            ip("link", "set", outside, "up")
            ip("-n", netns, "addr", "add", f"{address}/{subnet.prefixlen}", "dev", inside)
            ip("-n", netns, "link", "set", inside, "up")
            ip("-n", netns, "link", "set", "lo", "up")
            hosts.append(Host(netns, address))
        yield Network(bridge, gateway, str(subnet), hosts)
    finally:
        # Deleting a veth end deletes its peer at once; a deleted namespace frees its links
        # only when the kernel gets round to it.
        for link in [*links, bridge]:
            ip("link", "delete", link, check=False)
        for netns in namespaces:
            _remove_namespace(netns)
