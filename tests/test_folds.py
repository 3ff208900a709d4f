"""Supervised folds out of an MVTec-layout test split (data.folds, `anomalyqc data folds`)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import invoke, stdout_json

from anomalyqc.data.folds import write_fold
from anomalyqc.errors import ConfigError, DataError
from anomalyqc.models import detector_class
from anomalyqc.workflow import training_listing

TYPES = {"scratch": 5, "spot": 3}


@pytest.fixture()
def mvtec(tmp_path: Path) -> Path:
    """train/good 3, test/good 2, test/scratch 5, test/spot 3, every defect with its mask."""
    root = tmp_path / "src"
    rng = np.random.default_rng(0)

    def png(path: Path, value: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), value)

    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            png(root / split / "good" / f"{i:03d}.png", rng.integers(0, 255, (16, 16), np.uint8))
    for t, n in TYPES.items():
        for i in range(n):
            png(root / "test" / t / f"{i:03d}.png", rng.integers(0, 255, (16, 16), np.uint8))
            mask = np.zeros((16, 16), np.uint8)
            mask[i:i + 3, 4:8] = 255
            png(root / "ground_truth" / t / f"{i:03d}_mask.png", mask)
    return root


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_folds_test_every_defect_once_and_train_on_the_rest(mvtec: Path, tmp_path: Path) -> None:
    outs = [tmp_path / f"fold{k}" for k in range(2)]
    for k, out in enumerate(outs):
        summary = write_fold(mvtec, out, folds=2, fold=k)
        assert summary["counts"]["train/good"] == 3 and summary["counts"]["test/good"] == 2
    for t, n in TYPES.items():
        tested = [_names(o / "test" / t) for o in outs]
        assert not tested[0] & tested[1] and len(tested[0] | tested[1]) == n  # each once
        for k, out in enumerate(outs):
            assert _names(out / "train" / t) == tested[1 - k]  # trained on the other fold
            # every image of both splits has its mask, the same bytes as the source's
            for name in _names(out / "train" / t) | _names(out / "test" / t):
                mask = out / "ground_truth" / t / f"{Path(name).stem}_mask.png"
                assert mask.read_bytes() == (mvtec / "ground_truth" / t / mask.name).read_bytes()
    assert _names(outs[0] / "test" / "scratch") == {"000.png", "002.png", "004.png"}
    meta = json.loads((outs[0] / "meta.json").read_text())
    assert meta["folds"] == 2 and meta["fold"] == 0 and meta["source"] == str(mvtec.resolve())
    # a supervised detector learns from the labelled training images, masks included
    listing = training_listing(detector_class("unet")(image_size=16), outs[0])
    kinds = sorted(r.defect_type for r in listing.records)
    assert kinds.count("good") == 3 and kinds.count("scratch") == 2 and kinds.count("spot") == 1
    assert all(r.mask_path is not None for r in listing.records if r.defect_type != "good")


def test_cli_folds_and_its_refusals(mvtec: Path, tmp_path: Path) -> None:
    out = tmp_path / "f"
    r = invoke("data", "folds", "--data", mvtec, "--out", out, "--folds", 3, "--fold", 2)
    assert r.exit_code == 0, r.output
    assert stdout_json(r.output)["counts"]["test/spot"] == 1
    r = invoke("data", "folds", "--data", mvtec, "--out", out, "--folds", 3, "--fold", 1)
    assert r.exit_code == 0, r.output  # an earlier fold is replaced whole
    assert _names(out / "test" / "spot") == {"001.png"}
    with pytest.raises(ConfigError, match="fold must be in"):
        write_fold(mvtec, tmp_path / "g", folds=2, fold=2)
    with pytest.raises(DataError, match="cannot be dealt into 4 folds"):
        write_fold(mvtec, tmp_path / "g", folds=4)
    with pytest.raises(ConfigError, match="must not hold one another"):
        write_fold(mvtec, mvtec / "inside")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="not empty"):
        write_fold(mvtec, foreign)
    assert (foreign / "notes.txt").read_text() == "keep"
    (mvtec / "ground_truth" / "spot" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="001.png: no mask"):
        write_fold(mvtec, tmp_path / "g")
