"""Reading Envoy's admin interface: which upstreams it holds healthy, and its counters. One
reader for `make run-cluster`'s launcher and every test that looks behind the front door."""

from __future__ import annotations

import urllib.request
from contextlib import suppress
from dataclasses import dataclass

CLUSTER = "shop"  # the cluster name in envoy.template.yaml


@dataclass(frozen=True)
class EnvoyAdmin:
    """Envoy's admin interface at host:port."""

    host: str
    port: int

    def get(self, path: str) -> str:
        """GET a page: "/clusters", "/stats?filter=...", "/ready"."""
        with urllib.request.urlopen(f"http://{self.host}:{self.port}{path}", timeout=5) as reply:
            return str(reply.read().decode())

    def health_flags(self) -> dict[str, str]:
        """Each upstream's health flags as /clusters shows them: "healthy", or e.g.
        "/failed_active_hc", "/failed_outlier_check" (several joined by "/")."""
        flags: dict[str, str] = {}
        for line in self.get("/clusters").splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == CLUSTER and parts[2] == "health_flags":
                flags[parts[1]] = parts[3]
        return flags

    def stats(self, pattern: str) -> dict[str, int]:
        """The counters and gauges whose names match the regex `pattern`."""
        found: dict[str, int] = {}
        for line in self.get(f"/stats?filter={pattern}").splitlines():
            name, _, value = line.partition(": ")
            with suppress(ValueError):
                found[name] = int(value)
        return found

    def stat(self, name: str) -> int:
        """One counter by its exact name; 0 before Envoy has counted anything."""
        return self.stats(f"^{name}$").get(name, 0)
