"""Provenance records: the commit and dirty flag, the command, versions and machine."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from importlib import metadata

import pytest

from anomalyqc.provenance import git_state, machine, package_versions, provenance

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, text=True,
                          stdout=subprocess.PIPE).stdout.strip()


@needs_git
def test_git_state_names_commit_and_dirty_flag(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    sha = _git(tmp_path, "rev-parse", "HEAD")
    assert git_state(tmp_path) == {"commit": sha, "dirty": False}
    (tmp_path / "untracked.txt").write_text("not part of the commit's code\n")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "a.txt").write_text("two\n")
    assert git_state(tmp_path) == {"commit": sha, "dirty": True}


def test_git_state_outside_a_repository(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None}


def test_package_versions_this_and_another_interpreter():
    mine = package_versions({"numpy": ("numpy",), "nope": ("no-such-dist-xyz", "numpy")})
    assert mine["packages"] == {"numpy": metadata.version("numpy"),
                                "nope": metadata.version("numpy")}
    assert mine["python"] == sys.version.split()[0]
    assert package_versions(["no-such-dist-xyz"])["packages"] == {"no-such-dist-xyz": None}
    # Asking an interpreter through a subprocess gives the same answer as asking in-process.
    other = package_versions(["numpy", "no-such-dist-xyz"], python=sys.executable)
    assert other == package_versions(["numpy", "no-such-dist-xyz"])


def test_provenance_records_command_machine_and_time(tmp_path):
    p = provenance(argv=["bench.py", "--only", "padim x"], packages=["numpy"], repo=tmp_path)
    assert shlex.split(p["command"]) == [sys.executable, "bench.py", "--only", "padim x"]
    assert p["packages"] == {"numpy": metadata.version("numpy")}
    assert p["commit"] is None
    m = machine()
    assert isinstance(m["cores"], int) and m["cores"] >= 1
    assert 1 <= m["usable_cores"] <= m["cores"]
    assert m["ram_gib"] is None or m["ram_gib"] > 0
    assert p["machine"]["cpu"] == m["cpu"]
    assert p["utc"].endswith("+00:00")
