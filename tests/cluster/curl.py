"""JSON over HTTP with Debian's curl, as a user's shell would send it (tests/tools.py: CURL)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.cluster import Cluster
from tests import tools


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[Any]:
        """A newline-delimited JSON body (an export), one message per line."""
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


def curl(*args: str) -> Reply:
    """Run Debian's curl (`curl -sS -i ARGS`) and split its answer into status, headers, body."""
    binary = tools.require(tools.CURL)
    done = subprocess.run(
        [binary, "-sS", "-i", "--max-time", "30", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"curl {args} failed ({done.returncode}): {done.stderr}"
    head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
    status_line, *header_lines = head.splitlines()
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in header_lines)
    }
    return Reply(int(status_line.split()[1]), headers, body)


def post_json(url: str, body: dict[str, Any]) -> Reply:
    return curl("-X", "POST", url, "-H", "content-type: application/json", "-d", json.dumps(body))


def logs_of(cluster: Cluster) -> str:
    """Envoy's and the replicas' logs, for a failure message."""
    folder = Path(cluster.config).parent
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(folder.glob("*.log")))
