"""Supervised U-Net: learns a tiny segmentation task, round-trips, resumes through the
trainer, refuses data without masks, and fits/evaluates from the command line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalyqc.errors import ConfigError, DataError
from anomalyqc.evaluation.metrics import pixel_auroc
from anomalyqc.models import Detector, Unet
from anomalyqc.models.unet.model import soft_dice_loss
from anomalyqc.types import Batch, Sample

pytestmark = pytest.mark.usefixtures("one_thread")
SIDE = 32
TINY = {"image_size": SIDE, "preset": "small", "unet_depth": 2, "batch_size": 8,
        "loss_curves": False, "val_fraction": 0.0}


def _task(n: int, seed: int) -> Batch:
    """Noisy gray images, every other one with a dark 5x5 square and its mask."""
    g = torch.Generator().manual_seed(seed)
    x = 0.6 + 0.05 * torch.randn(n, 1, SIDE, SIDE, generator=g)
    mask = torch.zeros(n, 1, SIDE, SIDE)
    label = torch.zeros(n, dtype=torch.long)
    for i in range(0, n, 2):
        r, c = torch.randint(2, SIDE - 7, (2,), generator=g).tolist()
        x[i, 0, r:r + 5, c:c + 5] -= 0.25
        mask[i, 0, r:r + 5, c:c + 5] = 1
        label[i] = 1
    return Batch(image=x.clamp(0, 1), label=label, mask=mask,
                 defect_type=["spot" if int(v) else "good" for v in label], path=[""] * n)


def _samples(b: Batch) -> list[Sample]:
    return [Sample(image=b.image[i], label=int(b.label[i]),
                   mask=b.mask[i] if int(b.label[i]) else None,  # good images come without
                   defect_type=b.defect_type[i]) for i in range(len(b))]


@pytest.fixture(scope="module")
def trained() -> Unet:
    return Unet(TINY, epochs=8).fit([_task(32, seed=0)])  # type: ignore[return-value]


@pytest.mark.parametrize("loss", ["dice_bce", "focal"])
def test_learns_a_tiny_segmentation_task(loss: str, trained: Unet) -> None:
    det = trained if loss == "dice_bce" else Unet(TINY, epochs=8, loss="focal", lr=5e-3).fit(
        [_task(32, seed=0)])
    held_out = _task(16, seed=1)
    pred = det.predict(held_out.image)
    assert pred.anomaly_map.shape == (16, 1, SIDE, SIDE)
    assert 0 <= float(pred.anomaly_map.min()) and float(pred.anomaly_map.max()) <= 1
    assert pixel_auroc(held_out.mask.numpy().astype(np.uint8), pred.anomaly_map.numpy()) > 0.9
    # the image score is the map's max: defect images score above good ones
    spots, goods = pred.score[held_out.label == 1], pred.score[held_out.label == 0]
    assert float(spots.min()) > float(goods.max())
    assert torch.allclose(pred.score, pred.anomaly_map.flatten(1).amax(1))


def test_smoothed_score_is_below_the_raw_max(trained: Unet) -> None:
    x = _task(4, seed=2).image
    raw = trained.predict(x).score
    trained.config.score_window = 5
    try:
        smooth = trained.predict(x).score
    finally:
        trained.config.score_window = None
    assert bool((smooth <= raw + 1e-6).all()) and not torch.allclose(smooth, raw)


def test_save_and_load_give_identical_maps(trained: Unet, tmp_path: Path) -> None:
    run = trained.save(tmp_path / "run")
    back = Detector.load(run)
    assert isinstance(back, Unet)
    x = _task(6, seed=3).image
    a, b = trained.predict(x), back.predict(x)
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.score, b.score)


def test_resume_continues_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    data = _samples(_task(12, seed=4))
    cfg = {**TINY, "batch_size": 4, "val_fraction": 0.25}
    whole = Unet(cfg, epochs=3).fit_dataset(data, work_dir=tmp_path / "whole")
    Unet(cfg, epochs=2).fit_dataset(data, work_dir=tmp_path / "part")
    seen: set[str] = set()
    resumed = Unet(cfg, epochs=3).fit_dataset(
        data, lambda what, done, total: seen.add(what), work_dir=tmp_path / "part", resume=True)
    assert resumed.fit_report["epochs_run"] == 3
    assert seen == {"unet: epoch 3/3"}  # only the third epoch was trained again
    a, b = whole.state_tensors(), resumed.state_tensors()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_data_without_masks_is_refused_naming_where_masks_go(tmp_path: Path) -> None:
    data = _samples(_task(6, seed=5))
    data[0].mask = None  # a defect image without its mask
    with pytest.raises(DataError, match=r"ground_truth/<class>/<stem>_mask\.png"):
        Unet(TINY).fit_dataset(data, work_dir=tmp_path)
    only_good = [s for s in _samples(_task(6, seed=5)) if s.label == 0]
    with pytest.raises(DataError, match="no defect images with masks"):
        Unet(TINY).fit_dataset(only_good, work_dir=tmp_path)


def test_an_untrained_network_starts_at_the_prior_probability() -> None:
    det = Unet(TINY, channels=1, prior_probability=0.02)
    det._build()
    with torch.no_grad():
        prob = torch.sigmoid(det.nets["unet"].eval()(_task(2, seed=6).image))
    assert float(prob.mean()) == pytest.approx(0.02, rel=0.5)


def test_dice_loss_and_parameters() -> None:
    t = torch.zeros(1, 1, 4, 4)
    t[..., :2, :2] = 1
    assert float(soft_dice_loss(t.clone(), t, smooth=1e-6)) == pytest.approx(0, abs=1e-6)
    assert float(soft_dice_loss(1 - t, t, smooth=1e-6)) == pytest.approx(1, abs=1e-6)
    with pytest.raises(ConfigError, match="not divisible"):
        Unet(image_size=36, unet_depth=3)
    with pytest.raises(ConfigError, match="nothing to train"):
        Unet(w_bce=0, w_dice=0)
    with pytest.raises(ConfigError, match="not fitted"):
        Unet(TINY).predict(torch.zeros(1, 1, SIDE, SIDE))


def labelled_library(vials: Path, root: Path) -> Path:
    """A supervised MVTec-layout library from a `synth vials` folder: its train/good, its
    test defects also as train/<class>/ (stems prefixed "l") with their masks."""
    shutil.copytree(vials / "train" / "good", root / "train" / "good")
    shutil.copytree(vials / "test", root / "test")
    shutil.copytree(vials / "ground_truth", root / "ground_truth")
    for folder in (vials / "test").iterdir():
        if folder.name == "good":
            continue
        (root / "train" / folder.name).mkdir(parents=True)
        for img in folder.iterdir():
            shutil.copy(img, root / "train" / folder.name / f"l{img.name}")
            shutil.copy(vials / "ground_truth" / folder.name / f"{img.stem}_mask.png",
                        root / "ground_truth" / folder.name / f"l{img.stem}_mask.png")
    return root


def test_cli_fit_and_evaluate_on_a_labelled_library(tiny_vials: Path, tmp_path: Path) -> None:
    from conftest import invoke, run_commands_work, stdout_json

    lib = labelled_library(tiny_vials, tmp_path / "lib")
    run = tmp_path / "unet"
    r = invoke("fit", "unet", "--data", lib, "--out", run, "--image-size", 64, "--batch-size", 4,
               "--epochs", 2, "--set", "preset=small", "--set", "loss_curves=false")
    assert r.exit_code == 0, r.output
    info = stdout_json(r.output)
    assert info["detector"] == "unet" and info["epochs_run"] == 2
    assert info["images_per_class"]["good"] == 12 and sum(info["images_per_class"].values()) == 16
    assert (run / "training" / "log.csv").is_file()
    run_commands_work(run, lib, tmp_path)
    # the same library without its masks: refused before training, naming where they go
    shutil.rmtree(lib / "ground_truth")
    r = invoke("fit", "unet", "--data", lib, "--out", tmp_path / "nomask", "--image-size", 64)
    assert r.exit_code == 2 and "ground_truth/<class>/<stem>_mask.png" in r.output, r.output


def test_onnx_export_agrees_with_torch_and_blob_says_it_cannot(trained: Unet, tmp_path: Path) -> None:
    from anomalyqc.export.onnx import OnnxDetector, export_run
    from anomalyqc.models import Blob

    run = trained.save(tmp_path / "unet")
    assert export_run(run)["parity"]["within_tolerance"]
    x = _task(4, seed=7).image
    assert torch.allclose(OnnxDetector(run).predict(x).anomaly_map, trained.predict(x).anomaly_map,
                          atol=1e-4)
    blob = Blob(image_size=SIDE).fit([Batch.from_images(x)]).save(tmp_path / "blob")
    with pytest.raises(ConfigError, match="blob models cannot be exported"):
        export_run(blob)
