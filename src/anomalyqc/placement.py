"""Where a report or predictions folder may go: not into the data, not over a run.

A report written inside the dataset it evaluates is read back as data next time (its
roc.png scored as a good image, its examples folder as a defect class); one written into a
run folder overwrites the model's files (`--report RUN/config.json`). Both are refused
before any work starts, with one line naming the folder and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from anomalyqc.errors import ConfigError
from anomalyqc.models.storage import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
from anomalyqc.pathtext import display

RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE)


def _real(path: str | Path) -> Path:
    """Absolute, symlinks resolved (whether or not the path exists yet)."""
    return Path(os.path.realpath(path))


def check_output_folder(out: str | Path, what: str, data: Iterable[str | Path],
                        run: str | Path | None, fix: str,
                        beside: Iterable[str | Path] = ()) -> None:
    """Refuse `out` when it is, or is inside, one of the `data` folders, when it is one of
    the `beside` folders (where named input files live: writing there mixes outputs with
    them, while a subfolder is never read back), or when it is a run folder (`run` itself or
    any folder holding a run's files). `what` names the output ("report folder", "--out
    folder") and `fix` says where to write instead."""
    target = _real(out)
    for folder in beside:
        if target == _real(folder):
            raise ConfigError(
                f"{what} {display(out)} is the folder of the input images: the outputs would "
                f"be read as images next time; {fix}")
    for folder in data:
        src = _real(folder)
        if target == src or target.is_relative_to(src):
            raise ConfigError(
                f"{what} {display(out)} is inside the data it reads ({display(folder)}): its "
                f"images would be read as data next time; {fix}")
    held = [name for name in RUN_FILES if (target / name).exists()]
    if (run is not None and target == _real(run)) or held:
        holds = f" (it holds {', '.join(held)})" if held else ""
        raise ConfigError(
            f"{what} {display(out)} is a run folder{holds}: writing there would overwrite or "
            f"mix with the model's files; {fix}")
