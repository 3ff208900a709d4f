"""Checks of option values made before any work starts: a value that cannot work, or two
options that contradict each other, cost nothing and never leave a half-done run. Each
check raises ConfigError naming the option(s) and what to do instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anomalyqc.errors import ConfigError

# --set keys that have an option of their own: given both ways, one would silently win.
DEDICATED = {"image_size": "--image-size", "crop_size": "--crop-size", "backbone": "--backbone",
             "epochs": "--epochs", "width": "--width", "batch_size": "--batch-size",
             "num_workers": "--workers"}


def at_least(value: int, least: int, option: str) -> int:
    """`value` itself, or a ConfigError when it is below `least` (batch sizes, repeats...)."""
    if value < least:
        raise ConfigError(f"{option} must be at least {least}, got {value}")
    return value


def no_dedicated_sets(sets: dict[str, Any]) -> None:
    """Refuse `--set image_size=...` and the like: the dedicated option would be overridden."""
    for key, option in DEDICATED.items():
        if key in sets:
            raise ConfigError(f"--set {key}={json.dumps(sets[key])} conflicts with {option}: "
                              f"give the value with {option} only")


def threshold_options(method: str | None, value: float | None, recalibrate: bool = False,
                      stored: Path | None = None) -> str:
    """The threshold method to use (method None = not given = "f1"), or a ConfigError when
    the options contradict each other.

    `recalibrate` is evaluate's --recalibrate; `stored` is the run's threshold.json when it
    has one (evaluate uses it, so a method given without --recalibrate would be ignored).
    """
    chosen = method or "f1"
    if chosen == "fixed":
        if value is None:
            raise ConfigError("--threshold-method fixed needs --threshold VALUE")
        return chosen
    if value is not None:
        if recalibrate:
            raise ConfigError(
                f"--recalibrate chooses the threshold on this data by --threshold-method "
                f"{chosen} and would ignore --threshold {value:g}; to store {value:g} use "
                f"--threshold-method fixed --threshold {value:g}, or drop --threshold")
        raise ConfigError(f"--threshold {value:g} is only used with --threshold-method fixed "
                          f"(got {chosen}); add --threshold-method fixed, or drop --threshold")
    if method is not None and stored is not None and not recalibrate:
        raise ConfigError(
            f"the run already has a threshold ({stored}), which evaluate uses, so "
            f"--threshold-method {method} would be ignored; add --recalibrate to choose a new "
            f"one on this data, or drop --threshold-method")
    return chosen


def _first_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return p
    return Path(".")  # pragma: no cover - "/" always exists


def folder_target(path: Path, option: str) -> None:
    """`path` will be a folder we write into: it must be one, or not exist under a folder."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is an existing file, not a folder: choose a "
                          f"folder name, or move the file away")
    _parents_are_folders(path, option)


def file_target(path: Path, option: str, example: str = "metrics.json") -> None:
    """`path` will be a file we write: it may not be a folder or lie under a file."""
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; name a file in it, e.g. "
                          f"{path / example}")
    _parents_are_folders(path, option)


def _parents_are_folders(path: Path, option: str) -> None:
    above = _first_existing(path.parent)
    if not above.is_dir():
        raise ConfigError(f"{option} {path}: {above} is a file, not a folder; choose another "
                          f"place")


def metrics_target(path: Path, option: str = "--report") -> None:
    """The metrics JSON of `evaluate`: a new file, or one an earlier `evaluate` wrote, never
    some other file (a run's config.json, an image) that it would replace."""
    from anomalyqc.evaluation.report import METRICS_SCHEMA

    file_target(path, option)
    if not (path.exists() or path.is_symlink()):
        return
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        ours = isinstance(record, dict) and str(record.get("schema", "")).startswith(
            METRICS_SCHEMA.split("/")[0] + "/")
    except (OSError, UnicodeDecodeError, ValueError):
        ours = False
    if not ours:
        raise ConfigError(f"{option} {path} exists and is not a metrics file written by "
                          f"`anomalyqc evaluate`; it would be replaced: choose a new file name")
