"""`.ci/buf-breaking` (what `make buf-breaking` and CI run) in a scratch git repository holding a
copy of protos/: a commit that renumbers a field fails it; a compatible commit and a first
commit pass; and the real repository's contract passes against its previous commit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import tools

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "buf-breaking"
BUF = ROOT / ".venv" / "bin" / "buf"

pytestmark = pytest.mark.requires(tools.BUF, tools.GIT)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        timeout=60,
    )


def _buf_breaking(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=repo,
        env={**os.environ, "BUF": str(BUF)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A git repository whose first commit is a copy of today's protos/."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", repo / "protos")
    _git(repo, "init", "-q")
    _git(repo, "add", "protos")
    _git(repo, "commit", "-q", "-m", "contract")
    return repo


def _edit_user_proto(repo: Path, old: str, new: str) -> None:
    proto = repo / "protos" / "shop" / "v1" / "resources.proto"
    source = proto.read_text()
    assert old in source
    proto.write_text(source.replace(old, new, 1))
    _git(repo, "commit", "-q", "-am", "change")


def test_first_commit_has_nothing_to_compare(scratch: Path) -> None:
    done = _buf_breaking(scratch)
    assert done.returncode == 0, done.stderr
    assert "no earlier contract" in done.stdout


def test_renumbered_field_fails(scratch: Path) -> None:
    source = (scratch / "protos" / "shop" / "v1" / "resources.proto").read_text()
    email = re.search(r"string email = (\d+);", source)
    assert email is not None
    _edit_user_proto(scratch, email.group(0), "string email = 99;")
    done = _buf_breaking(scratch)
    assert done.returncode != 0
    assert "email" in done.stdout + done.stderr


def test_added_field_passes(scratch: Path) -> None:
    _edit_user_proto(scratch, "message User {", "message User {\n  string nickname = 98;")
    done = _buf_breaking(scratch)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no breaking change" in done.stdout


def test_this_repository_keeps_its_previous_contract() -> None:
    done = _buf_breaking(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
