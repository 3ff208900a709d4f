"""ROIs on the line: the layout's region masks reach the detectors that use them (GRD-Net),
in the one batched forward pass, and the strip heatmap respects them; the kit generator
writes them; the forward pass is timed per model."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import invoke, stdout_json

from anomalyqc.errors import ConfigError, DataError
from anomalyqc.line.inspect import LineModels, inspect_acquisition
from anomalyqc.line.kit import read_kit
from anomalyqc.line.layout import default_layout, layout_from_dict, load_layout, write_layout
from anomalyqc.line.patches import cut
from anomalyqc.line.validate import build_report, timing_summary
from anomalyqc.models.grdnet import Grdnet
from anomalyqc.models.padim import Padim
from anomalyqc.synth.kit import region_rois
from anomalyqc.synth.vials import VialStripConfig, pose_roi, render_strip
from anomalyqc.types import Batch

pytestmark = pytest.mark.usefixtures("one_thread")
STRIP = VialStripConfig(height=96, vial_pitch=24)
P = 32
KIT = ["--height", 96, "--frames", 4, "--patch-size", P,
       "--defect-types", "black_spot,stuck_particle,scratch"]  # fmt: skip
KEY = ["--key-frames", "1,2,4"]
TINY_GRD = {"image_size": P, "channels": 1, "width": 4, "unet_width": 4, "unet_depth": 2, "epochs": 1,
            "batch_size": 16, "loss_curves": False, "score_window": 3}  # fmt: skip


def _kit(out: Path, seed: int, good: int, defect: int, runs: int) -> Path:
    r = invoke("synth", "kit", "--out", out, "--seed", seed, "--n-good", good, "--n-defect", defect,
               "--runs", runs, *KIT)  # fmt: skip
    assert r.exit_code == 0, r.output
    return out


def _half_roi_layout(
    folder: Path, regions: tuple[str, ...] = ("flag", "shoulder", "liquid", "bottom"), disc: bool = False
) -> Path:
    """The synthetic layout with the named regions' ROI = the right half of the box (or a
    disc, whose edge no resize keeps on pixel borders)."""
    layout = default_layout(STRIP, P)
    folder.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((10, 10), np.uint8)
    mask[:, 5:] = 255
    if disc:
        mask = np.zeros((13, 11), np.uint8)
        cv2.circle(mask, (5, 6), 4, 255, -1)
    cv2.imwrite(str(folder / "half.png"), mask)
    for r in layout.regions:
        if r.name in regions:
            r.roi = "half.png"
    write_layout(layout, folder / "layout.yaml")
    return folder / "layout.yaml"


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Kits with ROIs, a tiny GRD-Net trained on their ROI patches, a PaDiM run."""
    root = tmp_path_factory.mktemp("lineroi")
    train = _kit(root / "train", 1, 2, 0, 1)
    cal = _kit(root / "cal", 4, 3, 3, 3)  # seed 4: the defective strips touch all four regions
    test = _kit(root / "test", 3, 3, 3, 3)
    kit = read_kit(train)
    frames = np.concatenate([r.load_frames() for s in kit.strips for r in s.runs])
    x = cut(torch.from_numpy(frames).float()[:, None] / 255, kit.layout, P).reshape(-1, 1, P, P)
    n = frames.shape[0] * kit.layout.n_vials
    roi = torch.from_numpy(kit.layout.roi_masks(P))[None].expand(n, -1, -1, -1).reshape(-1, 1, P, P)
    grd = Grdnet(TINY_GRD).fit([Batch(x, torch.zeros(len(x), dtype=torch.int64), roi=roi.contiguous())])
    assert grd.needs_roi
    grd.save(root / "grd")
    # pretrained weights (shipped in a pip package), so the statistics match on reload
    Padim(image_size=P, allow_download=False).fit([Batch.from_images(x)]).save(root / "padim")
    return {"root": root, "train": train, "cal": cal, "test": test, "frames": frames,
            "grd": Grdnet.load(root / "grd"), "x": x}  # fmt: skip


# ------------------------------------------------------------------ layout and kit ROIs


def test_layout_roi_masks_strip_roi_and_errors(tmp_path: Path) -> None:
    lay = load_layout(_half_roi_layout(tmp_path, ("shoulder",)))
    assert lay.roi_regions == ["shoulder"] and lay.source == tmp_path / "layout.yaml"
    m = lay.roi_masks((8, 6))  # any (h, w): the detector's input
    assert m.shape == (4, 8, 6) and m[0].all() and not m[1][:, :3].any() and m[1][:, 3:].all()
    s = lay.strip_roi((True, True, True, True))
    x0, y0, x1, y1 = lay.boxes()[2, 1]  # vial 2, shoulder: left half out
    mid = (x0 + x1) // 2
    assert not s[y0:y1, x0:mid].any() and s[y0:y1, mid:x1].all()
    assert s[lay.boxes()[2, 0][1] : lay.boxes()[2, 0][3], x0:x1].all()  # flag: no mask, whole box
    assert lay.strip_roi((True, False, True, True))[y0:y1, x0:x1].all()  # not restricted there
    # the same description equals its in-memory twin, which cannot find the mask files
    mem = layout_from_dict(lay.model_dump())
    assert mem == lay
    with pytest.raises(ConfigError, match=r"not read from a file.*load_layout"):
        mem.roi_masks()
    cv2.imwrite(str(tmp_path / "half.png"), np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"half\.png: the ROI mask of region shoulder is all zero"):
        load_layout(tmp_path / "layout.yaml").roi_masks()


def test_pose_roi_holds_the_plastic_of_every_pose() -> None:
    cfg = VialStripConfig()
    roi = pose_roi(cfg).astype(bool)
    for i in range(12):  # random poses, up to max_shift and max_rotation_deg
        s = render_strip(np.random.default_rng(i), cfg)
        assert not (s.roi.astype(bool) & ~roi).any()
    assert not roi.all() and not roi[0, :].any()  # the background above the flags is out
    lay = default_layout(cfg, 64)
    rois = region_rois(lay, cfg)
    x0, y0, x1, y1 = lay.boxes()[0, 0]
    assert rois["flag"].shape == (y1 - y0, x1 - x0) and 0 < rois["flag"].mean() < 1


def test_synth_kit_and_line_layout_write_region_rois(line: dict, tmp_path: Path) -> None:
    lay = load_layout(line["train"] / "layout.yaml")
    assert lay.roi_regions == lay.region_names
    assert all((line["train"] / r.roi).is_file() for r in lay.regions if r.roi)
    assert set(lay.roi_masks(P).ravel()) <= {0.0, 1.0}
    r = invoke("line", "layout", "--out", tmp_path / "prod.yaml", "--height", 256, "--patch-size", 64)
    assert r.exit_code == 0, r.output
    mine = load_layout(tmp_path / "prod.yaml")
    assert [x.roi for x in mine.regions] == [f"prod_roi/{n}.png" for n in mine.region_names]
    assert 0 < mine.roi_masks()[0].mean() < 1  # the flag's mask leaves the background out
    (tmp_path / "prod_roi" / "notes.txt").write_text("mine")
    r = invoke("line", "layout", "--out", tmp_path / "prod.yaml")
    assert r.exit_code == 2 and "notes.txt" in r.output and "--no-rois" in r.output
    r = invoke("line", "layout", "--out", tmp_path / "plain.yaml", "--no-rois")
    assert r.exit_code == 0 and load_layout(tmp_path / "plain.yaml").roi_regions == []


# ------------------------------------------------------------------ inspection with ROIs


def test_grdnet_gets_the_region_rois_in_one_batch_and_the_heatmap_respects_them(
    line: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grd = line["grd"]
    lay = load_layout(_half_roi_layout(tmp_path, ("flag", "shoulder", "liquid")))
    frames = read_kit(line["test"]).strips[0].runs[0].load_frames()
    seen: list[Batch] = []
    real = grd.predict
    monkeypatch.setattr(grd, "predict", lambda b: (seen.append(b), real(b))[1])
    models = LineModels.shared(grd, lay.region_names)
    res = inspect_acquisition(frames, lay, models, key_frames=(1, 2, 4))
    assert len(seen) == 1 and isinstance(seen[0], Batch) and len(seen[0]) == 60
    roi = seen[0].roi
    assert roi is not None and roi.shape == (60, 1, P, P)
    region = torch.arange(60) % 4  # (source, vial, region) order
    half = torch.zeros(P, P)
    half[:, P // 2 :] = 1
    for i in range(60):  # half masks on three regions, a full mask on the one without
        assert torch.equal(roi[i, 0], half if region[i] < 3 else torch.ones(P, P))
    # scores: the detector's own on the cut patches with those ROIs
    x = cut(torch.from_numpy(frames[[0, 1, 3]]).float()[:, None] / 255, lay, P).reshape(-1, 1, P, P)
    ref = real(Batch(x, torch.zeros(60, dtype=torch.int64), roi=roi))
    np.testing.assert_allclose(res.scores.ravel(), ref.score.numpy(), rtol=1e-4, atol=1e-6)
    # the strip heatmap is zero outside the ROIs (at strip resolution, where pasting the
    # masked patch maps alone would blur over the edges), and lit inside them
    lay = load_layout(_half_roi_layout(tmp_path / "disc", ("flag", "shoulder", "liquid"), disc=True))
    res = inspect_acquisition(frames, lay, models, key_frames=(1, 2, 4))
    inside = lay.strip_roi((True,) * 4)
    assert (res.heatmap[~inside] == 0).all() and (res.heatmap[inside] > 0).any()
    assert not inside.all()
    # a layout without ROIs is refused, naming the layout file and the fix
    plain = tmp_path / "plain"
    plain.mkdir()
    write_layout(default_layout(STRIP, P), plain / "layout.yaml")
    with pytest.raises(ConfigError, match=r"plain/layout\.yaml: regions flag, shoulder, liquid, bottom "
                                          r"have no ROI mask.*needs one per patch; add `roi:"):
        inspect_acquisition(frames, load_layout(plain / "layout.yaml"), models, key_frames=(1,))


def test_detectors_without_roi_use_ignore_the_layouts_rois(line: dict, tmp_path: Path) -> None:
    lay = load_layout(_half_roi_layout(tmp_path))
    padim = Padim(image_size=P, pretrained=False, allow_download=False).fit([Batch.from_images(line["x"])])
    got: list[object] = []
    real = padim.predict
    padim.predict = lambda b: (got.append(b), real(b))[1]  # type: ignore[method-assign]
    frames = line["frames"][:4]
    a = inspect_acquisition(frames, lay, LineModels.shared(padim, lay.region_names), key_frames=(1, 4))
    b = inspect_acquisition(frames, default_layout(STRIP, P), LineModels.shared(padim, lay.region_names),
                            key_frames=(1, 4))  # fmt: skip
    assert all(isinstance(g, torch.Tensor) for g in got)  # no Batch, no ROI
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.heatmap, b.heatmap)
    # a GRD-Net trained without ROIs gets them (it uses ROIs) but its heatmap is not cut
    x = line["x"][:64]
    whole = Grdnet(TINY_GRD).fit([Batch.from_images(x)])
    assert whole.uses_roi and not whole.needs_roi
    seen: list[Batch] = []
    real_w = whole.predict
    whole.predict = lambda b: (seen.append(b), real_w(b))[1]  # type: ignore[method-assign]
    res = inspect_acquisition(frames, lay, LineModels.shared(whole, lay.region_names), key_frames=(1,))
    assert isinstance(seen[0], Batch) and seen[0].roi is not None
    assert (res.heatmap[~lay.strip_roi((True,) * 4)] > 0).any()


# ------------------------------------------------------------------ timing per model


def test_forward_time_per_model_in_the_result_and_the_summary(line: dict) -> None:
    lay = load_layout(line["train"] / "layout.yaml")
    padim = Padim(image_size=24, pretrained=False, allow_download=False)
    x = cut(torch.from_numpy(line["frames"]).float()[:, None] / 255, lay, 24).reshape(-1, 1, 24, 24)
    padim.fit([Batch.from_images(x)])
    models = LineModels({"flag": padim, "shoulder": line["grd"], "liquid": line["grd"], "bottom": padim})
    keys = models.model_keys()
    assert keys == ["padim", line["grd"].model_id]  # a saved model's id, else the detector's name
    res = inspect_acquisition(line["frames"][:4], lay, models, key_frames=(1, 2, 4))
    assert list(res.model_timings_ms) == keys and all(v > 0 for v in res.model_timings_ms.values())
    assert sum(res.model_timings_ms.values()) <= res.timings_ms["forward"] + 1e-6
    t = [{"cut": 1.0, "forward": 9.0, "aggregate": 1.0, "total": 11.0}] * 3
    per = [{keys[0]: 99.0, keys[1]: 1.0}, {keys[0]: 2.0, keys[1]: 6.0}, {keys[0]: 4.0, keys[1]: 8.0}]
    s = timing_summary(t, 60, 500.0, per, models.describe())
    by = s["forward_by_model"]
    assert list(by) == keys and s["warmup_batches_excluded"] == 1  # the first batch is left out
    assert by[keys[0]]["median"] == 3.0 and by[keys[0]]["max"] == 4.0
    assert by[keys[0]]["regions"] == ["flag", "bottom"] and by[keys[0]]["n_patches_per_batch"] == 30
    assert by[keys[1]]["detector"] == "grdnet" and by[keys[1]]["mean_per_patch_ms"] == pytest.approx(7 / 30)
    # two copies of one model get distinct keys
    assert LineModels({"a": padim, "b": Padim(image_size=24)}).model_keys() == ["padim", "padim#2"]


def test_line_validate_with_grdnet_rois_and_a_model_per_region(line: dict, tmp_path: Path) -> None:
    root = line["root"]
    out = tmp_path / "report"
    r = invoke("line", "validate", "--model", root / "padim", "--model", f"shoulder={root / 'grd'}",
               "--model", f"liquid={root / 'grd'}", "--kit", line["test"], "--calibration", line["cal"],
               "--out", out, "--accept", "2/3", "--max-examples", 1, *KEY)  # fmt: skip
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["layout"]["roi_masks"]) == {"flag", "shoulder", "liquid", "bottom"}
    assert all(len(v["sha256"]) == 64 for v in rep["layout"]["roi_masks"].values())
    grd = next(m for m in rep["models"] if m["detector"] == "grdnet")
    assert grd["needs_roi"] and grd["regions"] == ["shoulder", "liquid"]
    by = rep["timing"]["forward_by_model"]
    assert {k: v["regions"] for k, v in by.items()} == {
        m["key"]: m["regions"] for m in rep["models"]
    } and len(by) == 2
    assert sorted(v["n_patches_per_batch"] for v in by.values()) == [30, 30]
    assert all(v["median"] > 0 for v in by.values())
    html = (out / "report.html").read_text()
    assert "Forward pass per model" in html and "grdnet" in html
    assert stdout_json(r.output)["timing"]["forward_by_model"] == by
    # the same GRD-Net with a layout without ROIs: refused before scoring, naming the layout
    plain = tmp_path / "plain.yaml"
    r = invoke("line", "layout", "--out", plain, "--height", 96, "--patch-size", P, "--no-rois")
    assert r.exit_code == 0, r.output
    r = invoke("line", "validate", "--model", root / "grd", "--kit", line["test"], "--layout", plain,
               "--calibration", line["cal"], "--out", tmp_path / "r2", "--accept", "2/3", *KEY)  # fmt: skip
    assert r.exit_code == 2 and "plain.yaml" in r.output and "roi:" in r.output
    assert not (tmp_path / "r2").exists()


def test_thresholds_hold_only_for_the_roi_masks_they_were_calibrated_with(line: dict, tmp_path: Path) -> None:
    import shutil

    root = line["root"]
    models = ["--model", root / "padim", "--model", f"shoulder={root / 'grd'}"]
    thr = tmp_path / "thr.json"
    r = invoke("line", "calibrate", *models, "--kit", line["cal"], "--out", thr, *KEY)
    assert r.exit_code == 0, r.output
    info = json.loads(thr.read_text())["info"]["roi_masks_sha256"]
    assert list(info) == ["shoulder"] and len(info["shoulder"]) == 64  # PaDiM's regions: not used
    base = ["line", "validate", *models, "--kit", line["test"], "--thresholds", thr, "--accept", "2/3",
            "--max-examples", 0, *KEY]  # fmt: skip
    assert invoke(*base, "--out", tmp_path / "ok").exit_code == 0
    # the same layout with another shoulder mask: refused, naming the region
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(line["test"] / "layout.yaml", other / "layout.yaml")
    shutil.copytree(line["test"] / "roi", other / "roi")
    m = cv2.imread(str(other / "roi" / "shoulder.png"), cv2.IMREAD_GRAYSCALE)
    m[:, : m.shape[1] // 2] = 0
    cv2.imwrite(str(other / "roi" / "shoulder.png"), m)
    r = invoke(*base, "--layout", other / "layout.yaml", "--out", tmp_path / "no")
    assert r.exit_code == 2 and "other ROI masks for regions shoulder" in r.output
    # a mask only PaDiM's regions use may change
    shutil.copy(line["test"] / "roi" / "shoulder.png", other / "roi" / "shoulder.png")
    cv2.imwrite(str(other / "roi" / "flag.png"), m)
    assert invoke(*base, "--layout", other / "layout.yaml", "--out", tmp_path / "ok2").exit_code == 0


def test_build_report_without_model_timings_still_works(line: dict) -> None:
    """KitScores built without per-model timings (an older caller) give an empty table."""
    from anomalyqc.line.validate import KitScores

    kit = read_kit(line["test"])
    a = sum(len(s.runs) for s in kit.strips)
    rng = np.random.default_rng(0)
    acqs = [(i, r.run) for i, s in enumerate(kit.strips) for r in s.runs]
    labels = np.stack([r.regions for s in kit.strips for r in s.runs]).astype(np.int8)
    ks = KitScores(kit, ["frame_1"], acqs, rng.random((a, 1, 5, 4)), labels,
                   [{"cut": 1.0, "forward": 1.0, "aggregate": 1.0, "total": 3.0}] * a)  # fmt: skip
    from anomalyqc.evaluation.thresholds import ThresholdChoice
    from anomalyqc.line.decisions import AcceptancePolicy
    from anomalyqc.line.thresholds import RegionThresholds

    names = kit.layout.region_names
    thr = RegionThresholds(names, [ThresholdChoice(0.5, "fixed", 0.0, 0, 0)] * 4, {n: None for n in names},
                           (1,), False)  # fmt: skip
    rep = build_report(ks, thr, AcceptancePolicy.parse("2/3"), 500.0)
    assert rep["timing"]["forward_by_model"] == {}


def test_detector_rois_follow_the_patch_geometry_resize_then_centre_crop(tmp_path: Path) -> None:
    from anomalyqc.line.inspect import detector_rois

    lay = load_layout(_half_roi_layout(tmp_path, ("liquid",), disc=True))
    grd = Grdnet({**TINY_GRD, "image_size": (40, 36), "crop_size": 32})
    got = detector_rois(lay, grd, [0, 1, 2, 3])
    assert got is not None and got.shape == (4, 1, 32, 32)
    ref = torch.from_numpy(lay.roi_masks((40, 36)))[:, None, 4:36, 2:34]
    assert torch.equal(got, ref) and not got[2].all() and got[0].all()
    assert detector_rois(lay, grd, [0, 1]) is None  # none of these regions has a mask
    assert detector_rois(lay, Padim(image_size=32, pretrained=False), [0, 1, 2, 3]) is None
