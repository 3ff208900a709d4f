"""Labelled training data out of an MVTec-layout test split, by folds.

A public anomaly dataset (MVTec AD) labels defects only in its test split. To train a
supervised detector (U-Net, classifier) on it and still test on defects it never saw, the
test defects of each type are dealt into K folds (image i of a type, in name order, to fold
i mod K: every fold gets every kind of the type); fold `fold` stays in test/, the others go
to train/<type>/ with their masks. Good images keep their split:

    OUT/train/good/            SRC/train/good
    OUT/train/<type>/          the test defects of the other folds
    OUT/test/good/             SRC/test/good
    OUT/test/<type>/           the test defects of fold `fold`
    OUT/ground_truth/<type>/   every mask of both (stems are unique within a type)
    OUT/meta.json              source, folds, fold and where every image went

Files are hard links where the file system allows (no copy of the data), copies otherwise.
Running the K folds in turn tests every defect image exactly once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from anomalyqc import __version__
from anomalyqc.data.io import is_image_file
from anomalyqc.errors import ConfigError, DataError
from anomalyqc.fileio import atomic_write_json, prepare_generated_folder

GENERATOR = "anomalyqc.data.folds"
_OUTPUT_ENTRIES = ("train", "test", "ground_truth", "meta.json")


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copyfile(src, dst)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def write_fold(src: str | Path, out: str | Path, folds: int = 2, fold: int = 0) -> dict[str, Any]:
    """Write fold `fold` of `folds` of the MVTec-layout dataset `src` to `out` (module
    docstring); returns the counts per split and type."""
    from anomalyqc.synth.vials import written_by

    src, out = Path(src), Path(out)
    if not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"folds must be an integer >= 2, got {folds!r}")
    if not isinstance(fold, int) or not 0 <= fold < folds:
        raise ConfigError(f"fold must be in [0, {folds}), got {fold!r}")
    good_train, test = src / "train" / "good", src / "test"
    if not good_train.is_dir() or not test.is_dir():
        raise DataError(f"{src}: not an MVTec-layout dataset (needs train/good/ and test/)")
    types = sorted(p.name for p in test.iterdir() if p.is_dir() and p.name != "good")
    if not types:
        raise DataError(f"{src}/test holds no defect folders: nothing to split into folds")
    if out.resolve().is_relative_to(src.resolve()) or src.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"the output {out} and the data {src} must not hold one another")
    plan: list[tuple[Path, str, str, Path | None]] = []  # (image, split, type, mask)
    for name in ("train", "test"):
        good = src / name / "good"
        if good.is_dir():
            plan += [(p, name, "good", None) for p in _images(good)]
    for t in types:
        images = _images(test / t)
        if len(images) < folds:
            raise DataError(f"{test / t}: {len(images)} image(s) cannot be dealt into {folds} "
                            f"folds; use fewer folds")
        for i, p in enumerate(images):
            mask = src / "ground_truth" / t / f"{p.stem}_mask.png"
            if not mask.is_file():
                raise DataError(f"{p}: no mask at {mask}; a supervised fold needs every "
                                f"defect's mask")
            plan.append((p, "test" if i % folds == fold else "train", t, mask))
    prepare_generated_folder(out, _OUTPUT_ENTRIES, out.is_dir() and written_by(out, GENERATOR),
                             "an earlier fold (no meta.json from anomalyqc.data.folds)")
    counts: dict[str, int] = {}
    placed: dict[str, str] = {}
    for image, split, t, mask_file in plan:
        _place(image, out / split / t / image.name)
        if mask_file is not None:
            _place(mask_file, out / "ground_truth" / t / mask_file.name)
        counts[f"{split}/{t}"] = counts.get(f"{split}/{t}", 0) + 1
        placed[f"{split}/{t}/{image.name}"] = str(image)
    counts = dict(sorted(counts.items()))
    atomic_write_json(out / "meta.json", {
        "generator": GENERATOR, "anomalyqc_version": __version__, "source": str(src.resolve()),
        "folds": folds, "fold": fold, "rule": "defect image i of a type (name order) is in "
        "fold i mod folds; fold `fold` is test/, the others train/", "counts": counts,
        "images": placed})
    return {"out_dir": str(out), "folds": folds, "fold": fold, "counts": counts}


__all__ = ["write_fold"]
