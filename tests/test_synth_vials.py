"""Synthetic BFS vial strips: determinism, masks, ROI, layout, patches, and difficulty."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import invoke
from sklearn.metrics import roc_auc_score

from anomalyqc.errors import ConfigError, DataError
from anomalyqc.synth.vials import (
    DEFECT_TYPES,
    StripSample,
    VialStripConfig,
    cut_patches,
    generate_vial_dataset,
    render_strip,
    vial_region_boxes,
)

CFG = VialStripConfig()


def _strip(seed: int | list[int], defect: str | None = None) -> StripSample:
    return render_strip(np.random.default_rng(seed), CFG, defect)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


# --------------------------------------------------------------------------- render_strip


@pytest.mark.parametrize("defect", [None, *DEFECT_TYPES])
def test_render_is_deterministic(defect: str | None) -> None:
    a, b = _strip(7, defect), _strip(7, defect)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.roi, b.roi)
    assert a.defects == b.defects
    c = _strip(8, defect)
    assert not np.array_equal(a.image, c.image)


def test_good_strip_shapes_and_types() -> None:
    s = _strip(0)
    assert s.image.shape == (CFG.height, CFG.width) == (256, 320)
    assert s.image.dtype == s.mask.dtype == s.roi.dtype == np.uint8
    assert s.defect_type == "good" and s.label == 0 and s.defects == []
    assert s.mask.sum() == 0
    assert set(np.unique(s.roi)) <= {0, 1}
    assert s.image.std() > 20  # not a blank frame


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defect_masks_are_exact_and_located(defect: str) -> None:
    for seed in range(6):
        s = _strip([11, seed], defect)
        assert s.label == 1 and s.defect_type == defect
        assert set(np.unique(s.mask)) == {0, 1}
        assert 1 <= len(s.defects) <= 2
        assert np.all(s.roi[s.mask > 0] == 1), "defect pixels must lie in the ROI"
        vials = {d.vial for d in s.defects}
        assert len(vials) == 1, "all defects of a strip are on one vial"
        for d in s.defects:
            assert d.type == defect and 0 <= d.vial < CFG.n_vials and 0 <= d.region < 4
            x0, y0, x1, y1 = s.boxes[d.vial, d.region]
            assert s.mask[y0:y1, x0:x1].sum() > 0
        if defect == "burn":
            assert all(d.region in (0, 1) for d in s.defects), "burns are on flag/shoulder"
        if defect == "bump":
            assert all(d.region in (1, 2, 3) for d in s.defects)


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defects_are_locally_visible_and_local(defect: str) -> None:
    """Same rng state with and without the defect: same strip, visible change only at the mask."""
    contrasts = []
    for seed in range(8):
        bad, clean = _strip([21, seed], defect), _strip([21, seed])
        diff = np.abs(bad.image.astype(np.int16) - clean.image.astype(np.int16))
        inside = bad.mask > 0
        contrasts.append(diff[inside].mean())
        far = cv2.dilate(bad.mask, np.ones((31, 31), np.uint8)) == 0
        assert np.mean(diff[far] == 0) > 0.995, "the defect changed the strip far from its mask"
    assert min(contrasts) >= 10.0, contrasts
    assert np.median(contrasts) >= 18.0, contrasts


def test_roi_covers_the_vials() -> None:
    s = _strip(3)
    roi = s.roi.astype(bool)
    assert 0.35 < roi.mean() < 0.85
    assert not roi[:4].any(), "rows above the flags are background"
    assert s.image[~roi].mean() - s.image[roi].mean() > 30, "vials are darker than the back light"
    row = roi[int(0.7 * CFG.height)]  # liquid body: 5 vials joined by the web
    cols = np.split(row, CFG.n_vials)
    assert all(c.sum() >= 0.75 * CFG.vial_pitch for c in cols[1:-1])
    flag_row = roi[int(0.12 * CFG.height)]  # separate flags: 5 runs of ROI
    runs = np.count_nonzero(np.diff(flag_row.astype(np.int8)) == 1) + int(flag_row[0])
    assert runs == CFG.n_vials


def test_vial_region_boxes_tile_the_strip() -> None:
    boxes = vial_region_boxes(CFG)
    assert boxes.shape == (5, 4, 4)
    cover = np.zeros((CFG.height, CFG.width), np.int32)
    for x0, y0, x1, y1 in boxes.reshape(-1, 4):
        assert x1 > x0 and y1 > y0
        cover[y0:y1, x0:x1] += 1
    assert np.all(cover == 1)
    moved = vial_region_boxes(CFG, offset=(2.2, -1.0))
    assert moved[1, 2, 0] == boxes[1, 2, 0] + 2 and moved[1, 2, 1] == boxes[1, 2, 1] - 1
    assert moved[0, 0, 1] == 0 and moved[4, 3, 3] == CFG.height  # outer edges stay clipped
    assert moved.min() >= 0 and moved[..., 2].max() <= CFG.width


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        VialStripConfig(region_splits=(0.6, 0.3, 0.8))
    with pytest.raises(ConfigError):
        VialStripConfig(defect_types=("crack",))
    with pytest.raises(ConfigError):
        render_strip(np.random.default_rng(0), CFG, "crack")


# --------------------------------------------------------------------------- difficulty


def test_pixel_thresholding_does_not_solve_it() -> None:
    """Global intensity rules must fail: nuisances are as dark/different as the defects."""
    train = [_strip([31, i]).image.astype(np.float32) for i in range(24)]
    mean_good = np.mean(train, axis=0)
    good = [_strip([32, i]) for i in range(32)]
    bad = {t: [_strip([33, j, i], t) for i in range(8)] for j, t in enumerate(DEFECT_TYPES)}

    def min_pixel(s: StripSample) -> float:  # darker minimum -> more anomalous
        return -float(s.image[s.roi > 0].min())

    def max_deviation(s: StripSample) -> float:
        return float(np.abs(s.image.astype(np.float32) - mean_good)[s.roi > 0].max())

    def auroc(score, samples_bad: list[StripSample]) -> float:
        g, b = [score(s) for s in good], [score(s) for s in samples_bad]
        return float(roc_auc_score([0] * len(g) + [1] * len(b), g + b))

    every = [s for v in bad.values() for s in v]
    assert auroc(min_pixel, every) < 0.9
    assert auroc(max_deviation, every) < 0.9
    assert auroc(min_pixel, bad["black_spot"]) < 0.9, (
        "dark particles must not be the darkest pixels"
    )
    # per-pixel thresholding of |image - mean good| does not segment them either
    ys = np.concatenate([s.mask[s.roi > 0] for s in every])
    sc = np.concatenate([np.abs(s.image - mean_good)[s.roi > 0] for s in every])
    assert roc_auc_score(ys, sc) < 0.9


# --------------------------------------------------------------------------- writers


@pytest.fixture(scope="module")
def strips_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vials") / "ds"
    summary = generate_vial_dataset(out, seed=5, n_train=5, n_test_good=3, n_test_defect=8)
    return out, summary


def test_layout_of_strips(strips_dir: tuple[Path, dict]) -> None:
    out, summary = strips_dir
    expected = {"train/good": 5, "test/good": 3, **{f"test/{t}": 2 for t in DEFECT_TYPES}}
    assert summary["counts"] == expected
    for key, n in expected.items():
        files = sorted((out / key).glob("*.png"))
        assert [f.name for f in files] == [f"{i:03d}.png" for i in range(n)]
        split, kind = key.split("/")
        for f in files:
            img = _read(f)
            assert img.shape == (256, 320) and img.dtype == np.uint8
            roi = _read(out / "roi" / split / kind / f"{f.stem}_roi.png")
            assert roi.shape == img.shape and set(np.unique(roi)) == {0, 255}
            gt = out / "ground_truth" / kind / f"{f.stem}_mask.png"
            if kind == "good":
                assert not gt.exists()
            else:
                mask = _read(gt)
                assert mask.shape == img.shape and set(np.unique(mask)) == {0, 255}
    assert not (out / "ground_truth" / "good").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 5 and meta["mode"] == "strips" and meta["config"]["n_vials"] == 5
    assert len(meta["test"]) == 3 + 8
    entry = meta["test"]["test/scratch/001.png"]
    assert entry["type"] == "scratch" and 0 <= entry["vial"] < 5 and 0 <= entry["region"] < 4
    assert meta["test"]["test/good/000.png"]["vial"] is None


def test_dataset_is_byte_identical_for_a_seed(tmp_path: Path) -> None:
    kw = {"n_train": 2, "n_test_good": 1, "n_test_defect": 4}
    generate_vial_dataset(tmp_path / "a", seed=9, **kw)
    generate_vial_dataset(tmp_path / "b", seed=9, **kw)
    generate_vial_dataset(tmp_path / "c", seed=10, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_refuses_foreign_folder_and_rewrites_own(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        generate_vial_dataset(foreign, n_train=1, n_test_good=0, n_test_defect=0)
    assert (foreign / "notes.txt").read_text() == "mine"
    own = tmp_path / "own"
    generate_vial_dataset(own, n_train=3, n_test_good=0, n_test_defect=0)
    generate_vial_dataset(own, n_train=1, n_test_good=0, n_test_defect=0)
    assert [p.name for p in (own / "train" / "good").iterdir()] == ["000.png"]


def test_patches_mode(tmp_path: Path) -> None:
    out = tmp_path / "p"
    summary = generate_vial_dataset(out, seed=2, n_train=2, n_test_good=1, n_test_defect=4,
                                    patches=True)  # fmt: skip
    name = re.compile(r"^(\d{3})_v([0-4])_r([0-3])\.png$")
    train = sorted(p.name for p in (out / "train" / "good").iterdir())
    assert len(train) == 2 * 20 and all(name.match(n) for n in train)
    assert {n[:3] for n in train} == {"000", "001"}
    n_defect = 0
    for t in DEFECT_TYPES:
        files = sorted((out / "test" / t).glob("*.png"))
        assert 1 <= len(files) <= 20, f"{t}: a defective strip yields its defect patches only"
        for f in files:
            assert name.match(f.name)
            img = _read(f)
            assert img.shape == (64, 64)
            mask = _read(out / "ground_truth" / t / f"{f.stem}_mask.png")
            assert mask.shape == (64, 64) and mask.max() == 255
            assert (out / "roi" / "test" / t / f"{f.stem}_roi.png").exists()
        n_defect += len(files)
    # the clean patches of the 4 defective strips are kept, in test/good, named by their type
    good = sorted(p.name for p in (out / "test" / "good").glob("*.png"))
    clean = [n for n in good if not name.match(n)]
    assert len(good) - len(clean) == 20 and len(clean) == 4 * 20 - n_defect
    kept = re.compile(r"^(" + "|".join(DEFECT_TYPES) + r")_(\d{3})_v([0-4])_r([0-3])\.png$")
    assert all(kept.match(n) for n in clean)
    assert not (out / "ground_truth" / "good").exists()  # no defect: no mask
    assert summary["counts"]["test/good"] == 20 + len(clean)
    assert summary["n_images"] == 40 + 20 + 4 * 20  # every patch of every test strip
    meta = json.loads((out / "meta.json").read_text())
    some = next(k for k in meta["test"] if k.startswith("test/bump/"))
    m = name.match(Path(some).name)
    assert meta["test"][some]["vial"] == int(m.group(2)) and meta["test"][some]["defects"]
    c = meta["test"][f"test/good/{clean[0]}"]
    assert c["type"] == "good" and c["strip_type"] == kept.match(clean[0]).group(1)  # type: ignore[union-attr]
    assert (out / "roi" / "test" / "good" / f"{Path(clean[0]).stem}_roi.png").exists()


def test_patches_mode_can_drop_the_clean_patches_of_defective_strips(tmp_path: Path) -> None:
    out = tmp_path / "p"
    r = invoke("synth", "vials", "--out", out, "--seed", 2, "--n-train", 1, "--n-test-good", 1,
               "--n-test-defect", 4, "--patches", "--drop-clean-patches")  # fmt: skip
    assert r.exit_code == 0, r.output
    good = sorted(p.name for p in (out / "test" / "good").glob("*.png"))
    assert len(good) == 20 and all(n[:3] == "000" for n in good)
    defect = sum(len(list((out / "test" / t).glob("*.png"))) for t in DEFECT_TYPES)
    assert 4 <= defect < 80
    assert json.loads((out / "meta.json").read_text())["config"]["keep_clean_patches_of_defective"] is False


def test_cut_patches_keep_every_defect_pixel() -> None:
    s = _strip(4, "black_spot")
    patches = cut_patches(s, patch_size=48)
    assert len(patches) == 20
    assert {(p.vial, p.region) for p in patches} == {(v, r) for v in range(5) for r in range(4)}
    assert all(p.image.shape == (48, 48) for p in patches)
    d = s.defects[0]
    hit = [p for p in patches if p.mask.any()]
    assert (d.vial, d.region) in {(p.vial, p.region) for p in hit}
    good = cut_patches(_strip(4), patch_size=48)
    assert not any(p.mask.any() for p in good)


def test_meniscus_levels_make_the_fill_height_multimodal() -> None:
    from anomalyqc.synth._render import make_geometry, sample_scene

    levels = (0.36, 0.56)
    cfg = VialStripConfig(meniscus_levels=levels)
    geo = make_geometry(cfg)
    rng = np.random.default_rng(0)
    y = np.concatenate([sample_scene(rng, cfg, geo).meniscus_y for _ in range(40)]) / cfg.height
    near = [np.abs(y - f) < 2.5 * cfg.meniscus_jitter + 1e-6 for f in levels]
    assert (near[0] | near[1]).all()  # every vial at one of the levels
    assert near[0].mean() > 0.3 and near[1].mean() > 0.3  # and both levels drawn
    default = np.concatenate([sample_scene(rng, CFG, make_geometry(CFG)).meniscus_y
                              for _ in range(40)]) / CFG.height
    assert np.abs(default - CFG.meniscus_level).max() < 2.5 * CFG.meniscus_jitter + 1e-6
    with pytest.raises(ConfigError, match="meniscus_levels"):
        VialStripConfig(meniscus_levels=(1.2,))


def test_regions_option_writes_only_those_region_patches(tmp_path: Path) -> None:
    out = tmp_path / "p"
    cfg = VialStripConfig(regions=(1,))
    generate_vial_dataset(out, seed=2, n_train=2, n_test_good=1, n_test_defect=0, patches=True,
                          cfg=cfg)
    names = [p.name for p in (out / "train" / "good").iterdir()]
    assert len(names) == 2 * 5 and all(n.endswith("_r1.png") for n in names)
    with pytest.raises(ConfigError, match="regions"):
        VialStripConfig(regions=(4,))
