"""Where a figure came from: commit, command, package versions, machine and time.

Every results JSON under benchmarks/ stores one of these dicts, so a figure can be re-checked
and a table is never assembled from runs of different commits. Standard library only (no
torch import), so it is cheap and works for any interpreter, including another venv's.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

# Table key -> distribution names to try in turn (the first one installed wins).
DEFAULT_PACKAGES: dict[str, tuple[str, ...]] = {
    "anomalyqc": ("anomalyqc",),
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "numpy": ("numpy",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
}

_VERSIONS_SNIPPET = """
import json, sys
from importlib import metadata
out = {}
for key, names in json.loads(sys.argv[1]).items():
    out[key] = None
    for name in names:
        try:
            out[key] = metadata.version(name)
            break
        except metadata.PackageNotFoundError:
            pass
print(json.dumps({"python": sys.version.split()[0], "packages": out}))
"""


def package_versions(
    packages: dict[str, tuple[str, ...]] | Sequence[str] | None = None,
    python: str | Path | None = None,
) -> dict[str, Any]:
    """{"python": "3.11.7", "packages": {key: version or None}} of this or another interpreter.

    Versions are read from the installed distributions' metadata, without importing them.
    `python` names another interpreter (e.g. a separate venv's) to ask instead of this one.
    """
    if packages is None:
        packages = DEFAULT_PACKAGES
    if not isinstance(packages, dict):
        packages = {name: (name,) for name in packages}
    wanted = {k: list(v) for k, v in packages.items()}
    if python is not None:
        out = subprocess.run([str(python), "-c", _VERSIONS_SNIPPET, json.dumps(wanted)],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        return json.loads(out)
    versions: dict[str, str | None] = {}
    for key, names in wanted.items():
        versions[key] = None
        for name in names:
            try:
                versions[key] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
    return {"python": sys.version.split()[0], "packages": versions}


def git_state(repo: str | Path | None = None) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None}; dirty means tracked files differ."""
    cwd = str(repo) if repo is not None else str(Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=cwd, check=True, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": bool(status.strip()) if status is not None else None}


def machine() -> dict[str, Any]:
    """CPU model, logical cores (all, and those this process may use) and RAM in GiB."""
    cpu = platform.processor() or platform.machine()
    ram_gib: float | None = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:  # not Linux: keep the platform module's answer
        pass
    if ram_gib is None and hasattr(os, "sysconf"):
        try:
            ram_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
        except (ValueError, OSError):
            pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "ram_gib": ram_gib,
            "system": f"{platform.system()} {platform.release()}"}


def provenance(
    argv: Sequence[str] | None = None,
    packages: dict[str, tuple[str, ...]] | Sequence[str] | None = None,
    repo: str | Path | None = None,
) -> dict[str, Any]:
    """Everything a results JSON needs to say where its figures came from.

    argv defaults to this process's command line; the command is the interpreter plus argv,
    quoted so it can be pasted into a shell (run from `cwd`).
    """
    args = list(sys.argv if argv is None else argv)
    versions = package_versions(packages)
    return {
        **git_state(repo),
        "command": shlex.join([sys.executable, *args]),
        "cwd": os.getcwd(),
        "python": versions["python"],
        "packages": versions["packages"],
        "machine": machine(),
        "utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
