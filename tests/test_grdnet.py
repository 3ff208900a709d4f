"""GRD-Net (models/grdnet): networks, the four ROI losses of 9.1.3.2, ROI-restricted
heatmaps and scores, save/load, ROIs through the CLI, and the zipper experiment (fig. 8.7)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from anomalyqc.errors import ConfigError, DataError
from anomalyqc.models.base import detector_class
from anomalyqc.models.grdnet import Grdnet
from anomalyqc.models.grdnet.model import (
    outside_loss,
    overlap_loss,
    roi_losses,
    roi_window_max,
)
from anomalyqc.models.reconstruction import focal_loss
from anomalyqc.nets import grdnet_config
from anomalyqc.synth.zipper import ZipperConfig, _rng, generate_zipper_dataset, render_zipper
from anomalyqc.types import Batch

TINY = {"image_size": 32, "width": 4, "unet_width": 4, "unet_depth": 2, "epochs": 1,
        "batch_size": 4, "loss_curves": False, "score_window": 5}
CLI_TINY = ["--image-size", "32", "--width", "4", "--batch-size", "4", "--epochs", "1",
            "--set", "unet_width=4", "--set", "unet_depth=2", "--set", "loss_curves=false"]
CASES = ("case1", "case2", "case3", "case4")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def zipper(kind: str, n: int, split: str = "test", size: int = 32, seed: int = 0,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (n, 1, S, S), ROIs and inside-defect masks of one kind of zipper image."""
    cfg = ZipperConfig(size=size)
    zs = [render_zipper(_rng(seed, split, kind, i), cfg, kind) for i in range(n)]

    def t(a: list[np.ndarray]) -> torch.Tensor:
        return torch.tensor(np.stack(a), dtype=torch.float32)[:, None]

    return t([z.image for z in zs]), t([z.roi for z in zs]), t([z.mask for z in zs])


def batch(x: torch.Tensor, roi: torch.Tensor | None) -> Batch:
    return Batch(image=x, label=torch.zeros(len(x), dtype=torch.long), roi=roi)


@pytest.fixture(scope="module")
def fitted() -> tuple[Grdnet, torch.Tensor, torch.Tensor]:
    """A one-epoch GRD-Net on 8 zipper images with their ROIs."""
    x, roi, _ = zipper("good", 8, "train")
    det = Grdnet(TINY).fit([batch(x, roi)])
    return det, x, roi


# ------------------------------------------------------------------------------ networks
def test_networks_are_the_preset_generator_a_unet_and_a_discriminator():
    det = Grdnet(channels=3)  # the defaults: 256x256, CRAE bottleneck 32x8x8
    assert det.config.stages == 5 and det.net_config() == grdnet_config(image_size=256)
    assert det.net_config().latent_shape == (32, 8, 8)
    dense = Grdnet(channels=3, bottleneck="dense")
    assert dense.net_config().latent_shape == (2048,)  # DRAE
    assert Grdnet(TINY).config.stages == 2  # 32 -> 8x8
    det = Grdnet({**TINY, "channels": 1})
    nets = det.build_networks()
    assert set(nets) == {"generator", "unet", "discriminator"}
    x = torch.rand(2, 1, 32, 32)
    x_hat, z, z_hat = nets["generator"](x)
    assert x_hat.shape == x.shape and z.shape == z_hat.shape == (2, 32, 8, 8)
    assert nets["unet"](x, x_hat).shape == (2, 1, 32, 32)
    logits, _ = nets["discriminator"](x)
    assert logits.shape == (2,)
    groups = det.optimizer_groups()  # L_tot trains G and the U-Net together (8.9)
    assert groups["generator"].networks == ("generator", "unet")
    assert groups["discriminator"].networks == ("discriminator",)
    assert detector_class("grdnet") is Grdnet


def test_parameters_are_checked_and_roi_loss_takes_descriptive_names():
    assert Grdnet(roi_loss="intersection").config.roi_loss == "case2"
    assert Grdnet(roi_loss="negated_overlap").config.roi_loss == "case4"
    assert Grdnet().config.roi_loss == "case2"  # the thesis's best, the default
    with pytest.raises(ConfigError, match="roi_loss"):
        Grdnet(roi_loss="case5")
    with pytest.raises(ConfigError, match="unet_depth"):
        Grdnet({**TINY, "unet_depth": 6})
    with pytest.raises(ConfigError, match="overlap_weight"):
        Grdnet(overlap_weight=2)


# -------------------------------------------------------------------------------- losses
def test_overlap_is_eq_9_3_on_binary_masks_and_negated_overlap_looks_outside():
    a = torch.zeros(1, 1, 8, 8)
    roi = torch.zeros(1, 1, 8, 8)
    roi[..., :4] = 1  # 32 px
    a[..., 2:6, 2:6] = 1  # 16 px, 8 of them in the ROI
    assert overlap_loss(a, roi, 1.0) == pytest.approx(1 - 8 / 16, abs=1e-5)
    assert overlap_loss(a, roi, 0.5) == pytest.approx(0.5 * (1 - 8 / 16), abs=1e-5)
    assert outside_loss(a, roi, 1.0) == pytest.approx(8 / 16, abs=1e-5)
    inside = torch.zeros_like(a)
    inside[..., 1:3, 1:3] = 1
    assert overlap_loss(inside, roi, 1.0) == pytest.approx(0, abs=1e-5)
    assert outside_loss(inside, roi, 1.0) == pytest.approx(0, abs=1e-5)
    soft = torch.rand(3, 1, 8, 8)
    assert 0 <= float(overlap_loss(soft, roi, 1.0)) <= 1


def test_the_four_cases_compute_differ_and_case_2_trains_inside_the_roi_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1, 16, 16, generator=g, requires_grad=True)
    mask = (torch.rand(4, 1, 16, 16, generator=g) > 0.8).float()
    roi = torch.zeros(4, 1, 16, 16)
    roi[..., 4:8] = 1
    mask = mask * roi
    totals = {}
    with torch.no_grad():
        a = torch.sigmoid(logits)
        for case in CASES:
            t = roi_losses(a, mask, roi, case, 2.0, None, 0.5)
            assert set(t) == {"focal", "overlap"} and all(torch.isfinite(v) for v in t.values())
            totals[case] = float(t["focal"] + t["overlap"])
        assert totals["case2"] == pytest.approx(float(focal_loss(a * roi, mask)), abs=1e-6)
    assert len({round(v, 6) for v in totals.values()}) == 4, totals
    # case 2's FL(A x ROI, M): no gradient reaches A outside the ROI; case 1's FL(A, M) does
    out = roi == 0
    grads = {}
    for case in ("case1", "case2"):
        loss = sum(roi_losses(torch.sigmoid(logits), mask, roi, case).values())
        (grads[case],) = torch.autograd.grad(loss, logits)
    grad1, grad2 = grads["case1"], grads["case2"]
    assert grad2[out].abs().max() == 0 and grad2[~out].abs().max() > 0
    assert grad1[out].abs().max() > 0


def test_score_is_the_window_max_inside_the_roi_not_diluted_at_its_border():
    roi = torch.zeros(1, 1, 16, 16)
    roi[..., 4:12] = 1
    a = torch.zeros(1, 1, 16, 16)
    a[..., 6:9, 4:6] = 1.0  # a blob on the ROI's left edge
    assert roi_window_max(a, roi, 3) == pytest.approx(1.0)  # zeros outside do not dilute it
    outside = torch.zeros_like(a)
    outside[..., :, :3] = 1.0
    assert roi_window_max(outside, roi, 3) == 0  # nothing inside: quiet
    assert roi_window_max(a, torch.zeros_like(roi), 3) == 0  # empty ROI: nothing to inspect
    spike = torch.zeros_like(a)
    spike[..., 8, 8] = 1.0
    assert roi_window_max(spike, roi, 3) == pytest.approx(1 / 9)  # a lone pixel weighs little
    assert roi_window_max(spike, roi, 1) == pytest.approx(1.0)


# ------------------------------------------------------------------- fit and predict
def test_heatmap_is_zero_outside_the_roi_and_the_score_is_read_inside(fitted):
    det, x, roi = fitted
    assert det.config.roi_mode == "roi" and det.needs_roi
    pred = det.predict(batch(x[:4], roi[:4]))
    assert pred.score.shape == (4,) and pred.anomaly_map.shape == (4, 1, 32, 32)
    assert torch.isfinite(pred.score).all()
    assert pred.anomaly_map[roi[:4] == 0].abs().max() == 0
    assert pred.anomaly_map[roi[:4] == 1].abs().max() > 0
    # the raw U-Net output differs from the masked one; the score follows the ROI given
    assert torch.allclose(pred.score, roi_window_max(pred.anomaly_map, roi[:4], 5), atol=1e-6)
    shifted = torch.roll(roi[:4], 8, dims=3)
    other = det.predict(batch(x[:4], shifted))
    assert other.anomaly_map[shifted == 0].abs().max() == 0
    assert not torch.equal(other.score, pred.score)
    assert pred.reconstruction is not None and pred.reconstruction.shape == (4, 1, 32, 32)
    assert "whole_image_score" in pred.extras


def test_a_model_trained_on_rois_refuses_images_without_one(fitted):
    det, x, _ = fitted
    with pytest.raises(ConfigError, match="trained with ROIs"):
        det.predict(x[:2])
    with pytest.raises(ConfigError, match="ROIs must be"):
        det.predict(batch(x[:2], torch.ones(2, 1, 16, 16)))


def test_without_rois_the_roi_is_the_whole_image():
    x, _, _ = zipper("good", 8, "train")
    det = Grdnet(TINY).fit([batch(x, None)])
    assert det.config.roi_mode == "whole_image" and not det.needs_roi
    pred = det.predict(x[:2])  # no ROI needed
    assert torch.equal(pred.score, pred.extras["whole_image_score"])
    with pytest.raises(ConfigError, match="roi_mode=roi"):
        Grdnet({**TINY, "roi_mode": "roi"}).fit([batch(x, None)])


def test_save_load_gives_identical_predictions(fitted, tmp_path):
    det, x, roi = fitted
    det.save(tmp_path / "run")
    loaded = Grdnet.load(tmp_path / "run")
    assert loaded.config.roi_mode == "roi" and loaded.config == det.config
    a, b = det.predict(batch(x, roi)), loaded.predict(batch(x, roi))
    assert torch.equal(a.score, b.score) and torch.equal(a.anomaly_map, b.anomaly_map)


@pytest.mark.parametrize("case", CASES)
def test_every_case_trains(case):
    x, roi, _ = zipper("good", 8, "train")
    det = Grdnet({**TINY, "roi_loss": case, "val_fraction": 0}).fit([batch(x, roi)])
    hist = det.train_result.history[-1]
    assert all(math.isfinite(v) for v in hist.values())
    assert (hist["train_overlap"] == 0) == (case == "case2")


# ------------------------------------------------------------------------------ CLI
def _write(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), a)


def folder_dataset(root: Path, n_good: int = 8, n_defect: int = 4) -> Path:
    """The folder layout: good/, inside/ and rois/<type>/ (zipper, 32 px; no masks: the
    CLI reads the folder layout with image labels only)."""
    cfg = ZipperConfig(size=32)
    for kind, n in (("good", n_good), ("inside", n_defect)):
        for i in range(n):
            z = render_zipper(_rng(1, "test", kind, i), cfg, kind)
            _write(root / kind / f"{i:02d}.png", (z.image * 255).astype(np.uint8))
            _write(root / "rois" / kind / f"{i:02d}.png", z.roi * 255)
    return root


@pytest.mark.slow
def test_cli_fit_evaluate_calibrate_predict_benchmark_with_roi_dir(tmp_path):
    from conftest import invoke, stdout_json

    data = folder_dataset(tmp_path / "zip")
    run = tmp_path / "run"
    fit = ["fit", "grdnet", "--data", data, "--out", run, *CLI_TINY]
    r = invoke(*fit)  # without --roi-dir the rois/ folder is not a defect class: refused
    assert r.exit_code == 2 and "roi_dir" in r.output
    r = invoke(*fit, "--roi-dir", "rois")
    assert r.exit_code == 0, r.output
    info = stdout_json(r.output)
    assert info["roi"] == "per image (8 ROI files)"
    assert json.loads((run / "config.json").read_text())["params"]["roi_mode"] == "roi"
    ev = ["evaluate", run, "--data", data]
    r = invoke(*ev)  # rois/ would be read as a defect class: refused, naming the option
    assert r.exit_code == 2 and "roi_dir" in r.output
    r = invoke(*ev, "--roi-dir", "rois", "--report", tmp_path / "rep" / "metrics.json")
    assert r.exit_code == 0, r.output
    m = stdout_json(r.output)
    assert math.isfinite(m["image_auroc"]) and m["n_defect"] == 4
    r = invoke("calibrate", run, "--data", data, "--roi-dir", "rois")
    assert r.exit_code == 0, r.output
    image = data / "inside" / "00.png"
    r = invoke("predict", run, image, "--out", tmp_path / "pred")
    assert r.exit_code == 2 and "--roi-dir" in r.output
    r = invoke("predict", run, image, "--out", tmp_path / "pred", "--roi-dir", data / "good")
    assert r.exit_code == 0, r.output  # good/00.png is taken as the ROI of inside/00.png
    r = invoke("predict", run, image, data / "good" / "07.png", "--out", tmp_path / "pred",
               "--roi-dir", data / "rois" / "inside")
    assert r.exit_code == 2 and "07.png has no ROI" in r.output
    r = invoke("predict", run, image, "--out", tmp_path / "pred", "--roi-dir",
               data / "rois" / "inside")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(rows) == 1 and rows[0]["decision"] in ("good", "defect")
    r = invoke("benchmark", run, "--data", data, "--roi-dir", "rois", "--repeats", 2,
               "--batch-size", 4)
    assert r.exit_code == 0, r.output


def test_cli_refuses_roi_dir_where_it_means_nothing(tmp_path):
    from conftest import invoke

    data = folder_dataset(tmp_path / "zip", n_good=4, n_defect=2)
    r = invoke("fit", "padim", "--data", data, "--out", tmp_path / "p", "--roi-dir", "rois",
               "--image-size", "32")
    assert r.exit_code == 2 and "does not use ROIs" in r.output
    (data / "rois" / "good" / "00.png").unlink()  # one good image left without an ROI
    r = invoke("fit", "grdnet", "--data", data, "--out", tmp_path / "g", "--roi-dir", "rois",
               *CLI_TINY)
    assert r.exit_code == 2 and "00.png has none" in r.output and "3 of 4" in r.output
    mv = generate_zipper_dataset(tmp_path / "mv", n_train=2, n_test={k: 1 for k in
                                 ("good", "inside", "outside", "both")},
                                 cfg=ZipperConfig(size=32))
    assert mv["n_train"] == 2
    r = invoke("fit", "grdnet", "--data", tmp_path / "mv", "--out", tmp_path / "g",
               "--roi-dir", "roi", *CLI_TINY)
    assert r.exit_code == 2 and "MVTec layout" in r.output


def test_workflow_reads_rois_only_for_detectors_that_use_them(tmp_path):
    from anomalyqc.workflow import dataset_for

    data = folder_dataset(tmp_path / "zip", n_good=2, n_defect=1)
    trained = Grdnet({**TINY, "roi_mode": "roi", "channels": 1})
    ds = dataset_for(trained, data, "test", roi_dir="rois")
    assert ds[0].roi is not None and ds[0].roi.shape == (1, 32, 32)
    mv = tmp_path / "mv"
    generate_zipper_dataset(mv, n_train=2, n_test={"good": 2, "inside": 1, "outside": 0,
                                                   "both": 0}, cfg=ZipperConfig(size=32))
    assert dataset_for(trained, mv, "test")[0].roi is not None  # ROOT/roi/, no option
    assert dataset_for(detector_class("padim")(image_size=32), mv, "test")[0].roi is None
    (mv / "roi" / "test" / "good" / "001_roi.png").unlink()
    with pytest.raises(DataError, match="trained with ROIs.*001.png has none"):
        dataset_for(trained, mv, "test")
    untrained = Grdnet({**TINY, "channels": 1})  # roi_mode auto: ROIs read where there are
    assert len(dataset_for(untrained, mv, "test")) == 3


# ----------------------------------------------------------------------- zipper (fig. 8.7)
@pytest.mark.slow
def test_zipper_inside_defects_are_flagged_and_outside_ones_are_not():
    """Trained on good zipper images with their ROIs, GRD-Net scores images with a defect
    in the zipper above good ones, and images with a defect in the fabric only like good
    ones; its heatmap lights the zipper defect and stays 0 in the fabric."""
    from sklearn.metrics import roc_auc_score

    x, roi, _ = zipper("good", 24, "train")
    det = Grdnet({**TINY, "width": 8, "unet_width": 8, "epochs": 50, "batch_size": 8,
                  "val_fraction": 0, "seed": 0}).fit([batch(x, roi)])
    assert det.train_result.steps == 150
    scores, maps = {}, {}
    for kind in ("good", "inside", "outside", "both"):
        xt, rt, mt = zipper(kind, 16)
        p = det.predict(batch(xt, rt))
        scores[kind], maps[kind] = p.score.numpy(), (p.anomaly_map, mt, rt)
    quiet = np.concatenate([scores["good"], scores["outside"]])
    flagged = np.concatenate([scores["inside"], scores["both"]])
    auroc = roc_auc_score([0] * len(quiet) + [1] * len(flagged), np.concatenate([quiet, flagged]))
    assert auroc >= 0.9, (auroc, scores)
    # outside-only defects look like good images: no better than a coin toss plus noise
    outside = roc_auc_score([0] * 16 + [1] * 16, np.concatenate([scores["good"],
                                                                 scores["outside"]]))
    assert outside <= 0.75, (outside, scores)
    amap, mask, rt = maps["inside"]  # the heatmap finds the defect among the ROI's pixels
    pixel = roc_auc_score(mask[rt > 0].numpy(), amap[rt > 0].numpy())
    assert pixel >= 0.75, pixel
    amap, _, rt = maps["outside"]
    assert amap[rt == 0].abs().max() == 0
