"""What a supervised detector fits on: every labelled training image, masks included."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from anomalyqc.errors import DataError
from anomalyqc.models import Padim
from anomalyqc.workflow import training_listing


class _Supervised(Padim):
    """Any detector with supervised=True reads the labelled images (fit itself is not used)."""

    supervised: ClassVar[bool] = True


def _png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)


def _mvtec_library(root: Path) -> Path:
    for i in range(3):
        _png(root / "train" / "good" / f"g{i}.png")
    for i in range(2):
        _png(root / "train" / "crack" / f"c{i}.png", 20)
        _png(root / "ground_truth" / "crack" / f"c{i}_mask.png", 255)
    _png(root / "test" / "good" / "t0.png")
    return root


def test_supervised_fit_reads_every_class_of_the_mvtec_train_split(tmp_path: Path) -> None:
    lib = _mvtec_library(tmp_path / "lib")
    records = training_listing(_Supervised(), lib).records
    assert sorted(r.defect_type for r in records) == ["crack", "crack", "good", "good", "good"]
    assert all(r.mask_path is not None for r in records if r.defect_type == "crack")
    # an unsupervised detector on the same library still fits on the good images only
    assert {r.defect_type for r in training_listing(Padim(), lib).records
            if r.label == 0} == {"good"}


def test_supervised_fit_reads_every_folder_of_the_folder_layout(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    _png(root / "good" / "a.png")
    _png(root / "glass" / "b.png")
    _png(root / "cake" / "c.png")
    types = sorted(r.defect_type for r in training_listing(_Supervised(), root).records)
    assert types == ["cake", "glass", "good"]


def test_supervised_fit_without_defect_images_says_what_to_add(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    _png(root / "train" / "good" / "a.png")
    with pytest.raises(DataError, match="supervised.*no defect images.*train/<class>"):
        training_listing(_Supervised(), root)
