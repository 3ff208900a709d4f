"""The labelled defect library (synth.library): layout, imbalance, holdout, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import invoke, stdout_json

from anomalyqc.errors import ConfigError, DataError
from anomalyqc.synth.library import CLASS_KINDS, LibraryConfig, generate_library, render_item

COUNTS = {"good": 5, "glass": 3, "particle_cake": 4, "foam": 2}


def _tiny(**kw) -> LibraryConfig:
    return LibraryConfig(counts=dict(kw.pop("counts", COUNTS)), patch_size=32, strip_height=128, **kw)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_layout_imbalance_masks_and_unique_stems(tmp_path: Path) -> None:
    out = tmp_path / "lib"
    summary = generate_library(out, 1, _tiny())
    for split in ("train", "test"):
        for cls, n in COUNTS.items():
            files = sorted((out / split / cls).glob("*.png"))
            assert len(files) == n, (split, cls)
            for f in files:
                img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
                assert img.shape == (32, 32) and img.dtype == np.uint8
                mask = out / "ground_truth" / cls / f"{f.stem}_mask.png"
                if cls == "good":
                    assert not mask.exists()
                else:  # every defect image has a non-empty mask of its size
                    m = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
                    assert m.shape == (32, 32) and m.max() == 255
    stems = [p.stem for p in out.glob("*/*/*.png") if p.parts[-3] in ("train", "test")]
    assert len(stems) == len(set(stems)) == 2 * sum(COUNTS.values())
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"] == summary["counts"]
    kinds = {v["kind"] for k, v in meta["images"].items() if v["class"] == "glass"}
    assert kinds == set(CLASS_KINDS["glass"])  # 3 glass images cycle through its 3 kinds


def test_holdout_class_is_only_in_test(tmp_path: Path) -> None:
    out = tmp_path / "lib"
    generate_library(out, 1, _tiny(holdout=("foam",)))
    assert not (out / "train" / "foam").exists()
    assert len(list((out / "test" / "foam").glob("*.png"))) == COUNTS["foam"]
    assert len(list((out / "train" / "glass").glob("*.png"))) == COUNTS["glass"]


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_library(a, 7, _tiny())
    generate_library(b, 7, _tiny())
    generate_library(c, 8, _tiny())
    fa = _files(a)
    assert fa == _files(b)
    assert (a / "meta.json").read_text() == (b / "meta.json").read_text()
    fc = _files(c)
    assert fa.keys() == fc.keys() and any(fa[k] != fc[k] for k in fa)


def test_an_image_does_not_depend_on_other_counts() -> None:
    small, large = _tiny(), _tiny(counts={"good": 9, "glass": 1, "particle_cake": 4})
    x = render_item(3, "test", "particle_cake", 2, small)
    y = render_item(3, "test", "particle_cake", 2, large)
    assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["mask"], y["mask"])


def test_bad_configs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown class"):
        LibraryConfig(counts={"good": 1, "dust": 2})
    with pytest.raises(ConfigError, match="holdout"):
        LibraryConfig(holdout=("dust",))
    with pytest.raises(ConfigError, match="good images"):
        LibraryConfig(counts={"good": 0, "glass": 2})
    with pytest.raises(ConfigError, match="min_contrast"):
        LibraryConfig(min_contrast=-1)
    with pytest.raises(ConfigError, match="particle_size_um"):
        generate_library(tmp_path / "x", 0, LibraryConfig(defect={"no_such": 1}))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        generate_library(foreign, 0, _tiny())


def test_cli_synth_library(tmp_path: Path) -> None:
    out = tmp_path / "lib"
    r = invoke("synth", "library", "--out", out, "--counts", "good=3,glass=2,foam=1",
               "--holdout", "foam", "--patch-size", 32, "--height", 128)
    assert r.exit_code == 0, r.output
    summary = stdout_json(r.output)
    assert summary["counts"] == {"test/foam": 1, "test/glass": 2, "test/good": 3,
                                 "train/glass": 2, "train/good": 3}
    r = invoke("synth", "library", "--out", tmp_path / "y", "--counts", "good=three")
    assert r.exit_code != 0 and "CLASS=N" in r.output


def test_every_defect_is_visible_and_the_contrast_measure_sees_it() -> None:
    """A labelled library holds defects an inspector could see: with min_contrast=0 the
    generator keeps glass defects drawn in the dark top of the strip (contrast ~0); with the
    default every defect image clears the contrast bar."""
    from anomalyqc.synth.library import defect_contrast

    flat = np.full((32, 32), 100, np.uint8)
    spot = np.zeros((32, 32), np.uint8)
    spot[14:18, 14:18] = 1
    assert defect_contrast(flat, spot) == 0.0
    assert defect_contrast(np.where(spot > 0, 60, 100).astype(np.uint8), spot) == 40.0
    assert defect_contrast(flat, np.zeros_like(spot)) == 0.0

    cfg = LibraryConfig(counts={"good": 1, "glass": 24})
    seen = [defect_contrast(it["image"], it["mask"])
            for it in (render_item(0, "train", "glass", i, cfg) for i in range(24))]
    assert min(seen) >= cfg.min_contrast
    loose = LibraryConfig(counts={"good": 1, "glass": 24}, min_contrast=0.0)
    raw = [defect_contrast(it["image"], it["mask"])
           for it in (render_item(0, "train", "glass", i, loose) for i in range(24))]
    assert min(raw) < 3.0  # the line generator's invisible defects exist ...
    assert sum(r < cfg.min_contrast for r in raw) >= 3  # ... often enough to matter
