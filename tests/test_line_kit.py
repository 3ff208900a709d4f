"""Test kits: the generator's folder layout, the reader's validation, and a hand-arranged kit."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomalyqc.errors import DataError
from anomalyqc.line.kit import GROUND_TRUTH, Kit, read_kit
from anomalyqc.line.layout import default_layout, write_layout
from anomalyqc.line.patches import region_labels
from anomalyqc.synth.acquisition import AcquisitionConfig, acquire, make_strip
from anomalyqc.synth.kit import _strip_rng, generate_kit, kit_plan
from anomalyqc.synth.vials import VialStripConfig

TINY = AcquisitionConfig(
    strip=VialStripConfig(height=96, vial_pitch=24), n_frames=4, body_diameter_mm=6.0,
    defect_types=("black_spot", "floating_particle"),
)  # fmt: skip
ARGS = {"seed": 3, "n_good": 2, "n_defect": 2, "n_runs": 2, "cfg": TINY, "patch_size": 32}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def kit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kit") / "KIT"
    summary = generate_kit(out, **ARGS)
    assert summary["n_images"] == 4 * 2 * 4
    return out


@pytest.fixture
def copy(kit_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "KIT"
    shutil.copytree(kit_dir, dst)
    return dst


def _gt(root: Path) -> dict:
    return json.loads((root / GROUND_TRUTH).read_text())


def _set_gt(root: Path, gt: dict) -> None:
    (root / GROUND_TRUTH).write_text(json.dumps(gt))


# --------------------------------------------------------------------------- generator + reader


def test_kit_layout_on_disk(kit_dir: Path) -> None:
    assert (kit_dir / "layout.yaml").is_file() and (kit_dir / GROUND_TRUTH).is_file()
    runs = sorted(p.relative_to(kit_dir).as_posix() for p in (kit_dir / "strips").glob("*/run_*"))
    assert runs[:2] == ["strips/strip_000/run_01", "strips/strip_000/run_02"] and len(runs) == 8
    names = sorted(p.name for p in (kit_dir / "strips" / "strip_000" / "run_01").iterdir())
    assert names == ["frame_01.png", "frame_02.png", "frame_03.png", "frame_04.png"]
    gt = _gt(kit_dir)
    assert gt["positive_class"].startswith("defective (label 1)")
    assert gt["n_frames"] == 4 and gt["n_runs"] == 2 and gt["pixel_size_um"] == pytest.approx(312.5)


def test_read_kit_gives_back_what_was_generated(kit_dir: Path) -> None:
    kit = read_kit(kit_dir)
    expected = default_layout(TINY.strip, 32)
    for reg in expected.regions:  # with the generator's ROI mask of each region
        reg.roi = f"roi/{reg.name}.png"
    assert isinstance(kit, Kit) and kit.n_frames == 4 and kit.layout == expected
    assert kit.layout.roi_masks().shape == (4, 32, 32)
    assert sorted(kit.labels.tolist()) == [0, 0, 1, 1]
    plan = {sid: (index, kind) for sid, index, kind in kit_plan(2, 2, TINY.defect_types, 3)}
    for s in kit.strips:
        index, kind = plan[s.strip_id]
        assert s.label == (kind != "good") and s.defect_types == ([] if kind == "good" else [kind])
        strip = make_strip(_strip_rng(3, kind, index), TINY, None if kind == "good" else kind)
        assert [r.run for r in s.runs] == [1, 2]
        for r in s.runs:
            acq = acquire(strip, r.run, TINY)
            assert np.array_equal(r.load_frames(), acq.frames)
            assert np.array_equal(r.load_masks(), acq.masks)
            assert r.regions is not None
            assert np.array_equal(r.regions, region_labels(acq.masks, kit.layout).any(axis=0))
            assert np.array_equal(r.vials, r.regions.max(axis=1))
            assert r.regions.any() == bool(s.label)
        assert all(m is None for r in s.runs for m in r.masks) == (s.label == 0)


def test_kit_is_deterministic_and_can_be_regenerated_in_place(kit_dir: Path, tmp_path: Path) -> None:
    generate_kit(tmp_path / "again", **ARGS)
    assert _digest(tmp_path / "again") == _digest(kit_dir)
    generate_kit(tmp_path / "again", **(ARGS | {"seed": 4}))  # a previous kit is replaced
    assert _digest(tmp_path / "again") != _digest(kit_dir)
    assert read_kit(tmp_path / "again").ground_truth["generator"]["seed"] == 4


def test_kit_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty and is not a kit"):
        generate_kit(tmp_path / "mine", **ARGS)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_kit_plan_spreads_types_and_hides_labels_in_ids() -> None:
    plan = kit_plan(120, 141, ("a", "b", "c"), seed=0)
    assert len(plan) == 261 and len({sid for sid, _, _ in plan}) == 261
    kinds = [k for _, _, k in plan]
    assert kinds.count("good") == 120 and [kinds.count(t) for t in "abc"] == [47, 47, 47]
    assert kinds[:120] != ["good"] * 120, "shuffled: the id does not give the label away"


# --------------------------------------------------------------------------- a hand-arranged kit


def test_a_users_own_kit_with_strip_labels_only(tmp_path: Path) -> None:
    layout = default_layout(VialStripConfig(height=96, vial_pitch=24), patch_size=32)
    write_layout(layout, tmp_path / "layout.yaml")
    for sid in ("A7", "B2"):
        for k in (1, 2, 3):
            d = tmp_path / "strips" / sid / f"run_{k}"
            d.mkdir(parents=True)
            for i in range(1, 11):  # no zero padding, 10 frames: numbers sort numerically
                cv2.imwrite(str(d / f"frame_{i}.png"), np.full((96, 120), i, np.uint8))
    regions = np.zeros((5, 4), int)
    regions[2, 1] = 1
    gt = {"format": "anomalyqc-line-kit", "format_version": 1,
          "strips": {"A7": {"label": 0}, "B2": {"label": 1, "regions": regions.tolist()}}}  # fmt: skip
    _set_gt(tmp_path, gt)
    kit = read_kit(tmp_path)
    assert kit.n_frames == 10 and [s.strip_id for s in kit.strips] == ["A7", "B2"]
    frames = kit.strips[0].runs[0].load_frames()
    assert frames.shape == (10, 96, 120) and frames[:, 0, 0].tolist() == list(range(1, 11))
    assert not kit.strips[0].runs[2].regions.any()
    assert np.array_equal(kit.strips[1].runs[1].regions, regions)
    del gt["strips"]["B2"]["regions"]
    _set_gt(tmp_path, gt)
    assert read_kit(tmp_path).strips[1].runs[0].regions is None, "unknown, not guessed"


# --------------------------------------------------------------------------- reader errors


def _first(root: Path, label: int) -> str:
    return next(sid for sid, v in _gt(root)["strips"].items() if v["label"] == label)


def _break(root: Path, how: str) -> Path:
    """Break a copy of the kit one way; return the path the error must name."""
    good, bad = _first(root, 0), _first(root, 1)
    run = root / "strips" / good / "run_01"
    if how == "no layout":
        (root / "layout.yaml").unlink()
        return root / "layout.yaml"
    if how == "no ground truth":
        (root / GROUND_TRUTH).unlink()
        return root / GROUND_TRUTH
    if how == "bad json":
        (root / GROUND_TRUTH).write_text("{")
        return root / GROUND_TRUTH
    gt = _gt(root)
    if how == "unlisted strip":
        del gt["strips"][good]
        _set_gt(root, gt)
        return root / "strips" / good
    if how == "listed strip without folder":
        gt["strips"]["ghost"] = {"label": 0}
        _set_gt(root, gt)
        return root / "strips"
    if how == "bad label":
        gt["strips"][good]["label"] = 2
        _set_gt(root, gt)
        return root / GROUND_TRUTH
    if how == "good with regions":
        gt["strips"][good]["regions"] = gt["strips"][bad]["regions"]
        _set_gt(root, gt)
        return root / GROUND_TRUTH
    if how == "bad regions shape":
        gt["strips"][bad]["runs"]["1"]["regions"] = [[0, 1]]
        _set_gt(root, gt)
        return root / GROUND_TRUTH
    if how == "run without folder":
        gt["strips"][bad]["runs"]["7"] = {"regions": gt["strips"][bad]["regions"]}
        _set_gt(root, gt)
        return root / GROUND_TRUTH
    if how == "frame gap":
        (run / "frame_02.png").unlink()
        return run
    if how == "fewer frames":
        (run / "frame_04.png").unlink()
        return run
    if how == "stray file":
        (run / "notes.txt").write_text("x")
        return run / "notes.txt"
    if how == "wrong size":
        cv2.imwrite(str(run / "frame_03.png"), np.zeros((50, 60), np.uint8))
        return run / "frame_03.png"
    if how == "not a png":
        (run / "frame_03.png").write_bytes(b"JFIF" * 10)
        return run / "frame_03.png"
    if how == "no runs":
        for p in (root / "strips" / good).iterdir():
            shutil.rmtree(p)
        return root / "strips" / good
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "no layout", "no ground truth", "bad json", "unlisted strip", "listed strip without folder",
        "bad label", "good with regions", "bad regions shape", "run without folder", "frame gap",
        "fewer frames", "stray file", "wrong size", "not a png", "no runs",
    ],
)  # fmt: skip
def test_read_kit_errors_name_the_file_and_the_fix(copy: Path, how: str) -> None:
    where = _break(copy, how)
    with pytest.raises(DataError) as e:
        read_kit(copy)
    msg = str(e.value)
    assert msg.startswith(str(where)), (how, msg)
    assert "\n" not in msg and (";" in msg or "must" in msg), msg


def test_read_kit_on_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="kit folder not found"):
        read_kit(tmp_path / "nope")
