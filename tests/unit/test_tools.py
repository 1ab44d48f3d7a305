"""tests/tools.py: a test whose tool is missing fails under CI and skips elsewhere, both through
`require()` and through the `requires` marker in a real pytest run; and no test in the suite
skips for a missing tool any other way."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tools

ABSENT = tools.Tool("no-such-tool", "`.ci/run` installs it from nowhere", lambda: None)
PRESENT = tools.Tool("sh", "it is always there", tools.executable("sh"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), ("", False), ("0", False), ("false", False), ("False", False),
     ("no", False), ("true", True), ("1", True), ("yes", True)],
)  # fmt: skip
def test_ci_means_a_true_value(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool
) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert tools.in_ci() is expected


def test_a_missing_tool_fails_in_ci_naming_it_and_its_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception) as failed:
        tools.require(ABSENT)
    assert "no-such-tool not found" in str(failed.value)
    assert "`.ci/run` installs it from nowhere" in str(failed.value)


def test_a_missing_tool_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        tools.require(ABSENT)
    assert "no-such-tool not found; `.ci/run` installs it from nowhere" in str(skipped.value)


def test_a_present_tool_gives_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    path = tools.require(PRESENT)
    assert Path(path).name == "sh"
    assert os.access(path, os.X_OK)


MARKED = """
import pytest
from tests import tools

ABSENT = tools.Tool("no-such-tool", "`.ci/run` installs it from nowhere", lambda: None)
PRESENT = tools.Tool("sh", "always there", tools.executable("sh"))


@pytest.fixture
def server():
    raise AssertionError("a fixture ran for a test whose tool is missing")


@pytest.mark.requires(ABSENT)
def test_needs_the_absent_tool(server):
    pass


@pytest.mark.requires(PRESENT)
def test_needs_a_present_tool():
    pass
"""


def _pytest_run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.tools"]\n')
    (tmp_path / "test_marked.py").write_text(MARKED)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(tools.ROOT)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_marker_fails_the_run_in_ci_before_fixtures(tmp_path: Path) -> None:
    done = _pytest_run(tmp_path, ci="true")
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "no-such-tool not found; `.ci/run` installs it from nowhere" in out
    assert "a fixture ran" not in out
    assert re.search(r"\b1 passed, 1 error\b", out), out


def test_the_marker_skips_outside_ci(tmp_path: Path) -> None:
    done = _pytest_run(tmp_path, ci=None)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert re.search(r"SKIPPED .*no-such-tool not found; `.ci/run` installs it from nowhere", out)
    assert re.search(r"\b1 passed, 1 skipped\b", out), out


# A test may still skip for a reason that is no tool's (none do today); this one keeps its own
# rule with the same effect (it fails when CI is set).
OWN_RULE = {"tests/unit/test_user_batch_encoder.py"}
SKIPS = re.compile(r"pytest\.(skip|importorskip)\(|mark\.skip(if)?\b")


def test_every_skip_for_a_tool_goes_through_tests_tools() -> None:
    offenders = []
    for path in sorted((tools.ROOT / "tests").rglob("*.py")):
        name = path.relative_to(tools.ROOT).as_posix()
        if name in OWN_RULE or name in ("tests/tools.py", "tests/unit/test_tools.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if SKIPS.search(line):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert offenders == [], "use tests.tools.require() or @pytest.mark.requires:\n" + "\n".join(
        offenders
    )
