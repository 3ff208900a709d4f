"""DRAEM (models/draem): networks and shapes, the score as the max of the smoothed mask,
learning to segment Perlin blobs, save/load, and the CLI end to end (fit, evaluate, predict,
calibrate, benchmark; a kill and --resume). Tiny sizes: 32x32, stems of 4 filters.

This file doubles as the script the kill test starts in another process:
`python tests/test_draem.py DATA OUT` runs `anomalyqc fit draem` and kills itself (SIGKILL)
after the first batch of the second epoch.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score
from torch import nn

from anomalyqc.errors import ConfigError
from anomalyqc.models import Draem, detector_class
from anomalyqc.models.draem.model import score_window, smoothed_max
from anomalyqc.models.reconstruction import focal_loss, ssim_per_image
from anomalyqc.nets import Autoencoder, UNet
from anomalyqc.synth.perlin import PerlinSynthesizer
from anomalyqc.training.interface import StepContext
from anomalyqc.types import Batch

HERE = Path(__file__).resolve()
TINY = {"image_size": 32, "width": 4, "stages": 2, "unet_width": 4, "unet_depth": 2,
        "epochs": 1, "batch_size": 4, "loss_curves": False}
CLI_TINY = ["--image-size", "32", "--width", "4", "--batch-size", "4", "--set", "stages=2",
            "--set", "unet_width=4", "--set", "unet_depth=2", "--set", "loss_curves=false"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def images(n: int = 8, seed: int = 0, channels: int = 1) -> torch.Tensor:
    """Smooth blobs on a dark ground: something a tiny autoencoder can partly learn."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    centres = torch.rand(n, 2, generator=g) - 0.5
    r2 = (yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2
    return (0.2 + 0.6 * torch.exp(-4 * r2))[:, None].expand(n, channels, 32, 32).contiguous()


# ------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("channels", [1, 3])
def test_networks_and_prediction_shapes(channels):
    x = images(8, channels=channels)
    det = Draem(TINY).fit([Batch.from_images(x)])
    rec, seg = det.nets["reconstructive"], det.nets["discriminative"]
    assert isinstance(rec, Autoencoder) and isinstance(seg, UNet)
    assert rec.config.bottleneck == "conv" and rec.config.latent_shape == (32, 8, 8)
    assert seg.inc[0].in_channels == 2 * channels  # concat(X, X_hat)
    pred = det.predict(x[:3])
    assert pred.score.shape == (3,) and pred.anomaly_map.shape == (3, 1, 32, 32)
    assert pred.reconstruction is not None and pred.reconstruction.shape == (3, channels, 32, 32)
    assert 0 <= float(pred.anomaly_map.min()) and float(pred.anomaly_map.max()) <= 1
    # every loss term is logged, in training and validation
    hist = det.train_result.history[0]
    assert {f"{p}_{k}" for p in ("train", "val") for k in ("loss", "l2", "ssim", "focal")} <= \
        set(hist)
    assert hist["val_loss"] == pytest.approx(hist["val_l2"] + hist["val_ssim"] + hist["val_focal"],
                                             rel=1e-5)


def test_one_optimizer_trains_both_networks():
    det = Draem(TINY)
    det.config.channels = 1
    det._build()
    groups = det.optimizer_groups()
    assert list(groups) == ["draem"]
    assert set(groups["draem"].networks) == {"reconstructive", "discriminative"}


def test_score_window_scales_with_the_input_and_stays_odd():
    assert score_window((256, 256)) == (21, 21)  # DRAEM's window at its size
    assert score_window((64, 64)) == (5, 5)
    assert score_window((32, 128)) == (3, 11)  # 2.6 -> 3; 10.5 -> 10 -> odd 11
    assert score_window((8, 8)) == (1, 1)
    assert score_window((64, 64), 4) == (5, 5) and score_window((64, 64), 7) == (7, 7)


class Planted(nn.Module):
    """A U-Net stand-in whose mask is fixed: logit(p) for a planted probability map p."""

    def __init__(self, prob: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.logit(prob.clamp(1e-7, 1 - 1e-7))

    def forward(self, image: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(image), -1, -1, -1)


def test_score_is_the_max_of_the_mask_smoothed_by_the_mean_filter():
    det = Draem({**TINY, "score_window": 3})
    det.config.channels = 1
    det._build()
    prob = torch.zeros(1, 1, 32, 32)
    prob[..., 10:13, 10:13] = 0.9  # a 3x3 blob: its mean over the window is 0.9
    prob[..., 25, 5] = 1.0  # a single hot pixel: the raw max, but only 1/9 once smoothed
    det.nets["discriminative"] = Planted(prob)
    with torch.no_grad():
        pred = det.infer(images(2))
    assert torch.allclose(pred.anomaly_map, prob.expand(2, -1, -1, -1), atol=1e-6)
    assert torch.allclose(pred.score, torch.full((2,), 0.9), atol=1e-5)
    # the window follows the input when not set: 32 px -> 3x3 here too
    det.config.score_window = None
    with torch.no_grad():
        assert torch.allclose(det.infer(images(1)).score, torch.tensor([0.9]), atol=1e-5)
    # a wider window dilutes the blob: 5x5 holds 9 pixels of 0.9
    det.config.score_window = 5
    with torch.no_grad():
        assert torch.allclose(det.infer(images(1)).score, torch.tensor([0.9 * 9 / 25]), atol=1e-5)
    # at the border the mean is over the pixels inside the image: a 2x2 corner blob counts
    # in full (zero padding would give 4/9)
    corner = torch.zeros(1, 1, 32, 32)
    corner[..., :2, :2] = 1.0
    assert torch.allclose(smoothed_max(corner, (3, 3)), torch.ones(1))


class Recording(Planted):
    """Planted, and keeps the images the U-Net was shown (X*)."""

    def forward(self, image: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        self.seen = image.detach().clone()
        return super().forward(image, reconstruction)


def test_loss_is_l2_and_ssim_against_the_clean_image_plus_focal_inside_the_roi():
    det = Draem({**TINY, "w_l2": 2.0, "w_ssim": 3.0, "w_focal": 5.0, "perturb_probability": 1.0})
    x = images(4)
    roi = torch.zeros(4, 1, 32, 32)
    roi[..., :, :16] = 1  # blobs on the left half only
    batch = Batch(image=x, label=torch.zeros(4, dtype=torch.int64), roi=roi)
    seg = Recording(torch.full((1, 1, 32, 32), 0.5))
    nets = {"reconstructive": nn.Identity(), "discriminative": seg}  # X_hat = X*, p = 1/2
    ctx = StepContext(nets, 0, 0, torch.Generator().manual_seed(1), torch.device("cpu"))
    terms = det.losses(batch, ctx, torch.Generator().manual_seed(2))
    p = det.synth(x, roi=roi, generator=torch.Generator().manual_seed(2))  # the same draw
    assert torch.equal(seg.seen, p.images)
    assert bool((p.images != x)[..., :16].any()) and torch.equal(p.images[..., 16:], x[..., 16:])
    # an autoencoder that copies X* is charged against the clean X
    l2 = F.mse_loss(p.images, x)
    ssim = (1 - ssim_per_image(p.images, x)).mean()
    assert float(l2) > 0 and terms["l2"] == pytest.approx(float(l2))
    assert terms["ssim"] == pytest.approx(float(ssim), rel=1e-5)
    assert terms["focal"] == pytest.approx(0.25 * math.log(2), rel=1e-4)  # p = 1/2 anywhere
    assert terms["loss"] == pytest.approx(2 * float(l2) + 3 * float(ssim) + 5 * 0.25 * math.log(2),
                                          rel=1e-5)


# ------------------------------------------------------------------------------ learning
def test_training_a_few_epochs_teaches_the_unet_to_find_perlin_blobs():
    x = images(16)
    fixed = PerlinSynthesizer(probability=1.0)(x[:8], generator=torch.Generator().manual_seed(5))
    cfg = {**TINY, "unet_width": 8, "epochs": 6, "val_fraction": 0, "lr": 2e-3,
           "schedule": "constant"}

    def segment(det: Draem) -> tuple[float, float]:
        for net in det.nets.values():
            net.eval()
        with torch.no_grad():
            x_hat = det.nets["reconstructive"](fixed.images)
            prob = torch.sigmoid(det.nets["discriminative"](fixed.images, x_hat))
        auroc = roc_auc_score(fixed.mask.flatten().numpy(), prob.flatten().numpy())
        return float(focal_loss(prob, fixed.mask)), float(auroc)

    start = Draem(cfg)
    start.config.channels = 1
    start._build()  # the weights fit starts from (seeded)
    focal0, auroc0 = segment(start)
    trained = Draem(cfg).fit([Batch.from_images(x)])
    focal1, auroc1 = segment(trained)
    # measured: focal 0.127 -> 0.078, pixel AUROC 0.29 -> 0.69 on blobs never trained on
    assert focal1 < 0.75 * focal0
    assert auroc1 > 0.6 and auroc1 > auroc0 + 0.2
    hist = trained.train_result.history
    assert hist[-1]["train_focal"] < hist[0]["train_focal"]


def test_validation_blobs_are_the_same_every_epoch():
    det = Draem(TINY)
    det.config.channels = 1
    det._build()
    for net in det.nets.values():
        net.eval()
    batch = Batch.from_images(images(4))

    def validate(epoch: int, b: Batch = batch) -> dict[str, float]:
        # the trainer hands each epoch's validation another random stream
        ctx = StepContext(det.nets, epoch, 10 * epoch, torch.Generator().manual_seed(epoch),
                          torch.device("cpu"))
        with torch.no_grad():
            return det.validation_step(b, ctx)

    first = validate(0)
    assert validate(1) == first and validate(7) == first  # same images, same blobs
    other = validate(0, Batch.from_images(images(4, seed=1)))
    assert other["focal"] != first["focal"]
    # training draws from the step's stream: new blobs every step
    ctx = [StepContext(det.nets, 0, i, torch.Generator().manual_seed(i), torch.device("cpu"))
           for i in (0, 1)]
    with torch.no_grad():
        a, b = (det.losses(batch, c, c.generator)["focal"] for c in ctx)
    assert float(a) != float(b)


# ------------------------------------------------------------------------ save and load
def test_save_load_gives_identical_predictions(tmp_path):
    x = images(8)
    det = Draem(TINY).fit([Batch.from_images(x)])
    pred = det.predict(x)
    det.save(tmp_path / "run")
    names = set(load_file(tmp_path / "run" / "weights.safetensors"))
    assert any(n.startswith("reconstructive.") for n in names)
    assert any(n.startswith("discriminative.") for n in names)
    again = Draem.load(tmp_path / "run").predict(x)
    assert torch.equal(again.score, pred.score)
    assert torch.equal(again.anomaly_map, pred.anomaly_map)
    assert torch.equal(again.reconstruction, pred.reconstruction)


def test_bad_parameters_are_one_line_errors():
    assert detector_class("draem") is Draem
    with pytest.raises(ConfigError, match="unet_depth"):
        Draem({**TINY, "image_size": 40, "stages": 3, "unet_depth": 4})
    with pytest.raises(ConfigError, match="score_window"):
        Draem(score_window=0)
    with pytest.raises(ConfigError, match="perlin_source"):
        Draem(perlin_source="folder")
    with pytest.raises(ConfigError, match="not fitted"):
        Draem(TINY).predict(images(2))


# ------------------------------------------------------------------------------- CLI
def _fit_args(data: Path, out: Path) -> list[str]:
    return ["fit", "draem", "--data", str(data), "--out", str(out), *CLI_TINY]


@pytest.mark.slow
def test_cli_fit_evaluate_predict_calibrate_benchmark(tiny_vials, tmp_path):
    from conftest import invoke, run_commands_work, stdout_json

    run = tmp_path / "draem"
    r = invoke(*_fit_args(tiny_vials, run), "--epochs", 2)
    assert r.exit_code == 0, r.output
    info = stdout_json(r.output)
    assert info["detector"] == "draem" and info["epochs_run"] == 2
    assert info["seconds_per_epoch"] > 0 and math.isfinite(info["best_validation_loss"])
    assert (run / "training" / "log.csv").is_file()
    params = json.loads((run / "config.json").read_text())["params"]
    assert params["epochs"] == 2 and params["unet_width"] == 4
    run_commands_work(run, tiny_vials, tmp_path)


@pytest.mark.slow
def test_cli_killed_then_resumed_matches_the_uninterrupted_run(tiny_vials, tmp_path):
    from conftest import invoke

    more = ["--epochs", 2, "--set", "checkpoint_every=1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = invoke(*_fit_args(tiny_vials, whole), *more)
    assert r.exit_code == 0, r.output
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, str(HERE), str(tiny_vials), str(killed)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    meta = json.loads((tmp_path / "killed.training" / "checkpoint" / "checkpoint.json")
                      .read_text())
    assert meta["progress"]["epoch"] == 1  # stopped inside the second epoch
    r = invoke(*_fit_args(tiny_vials, killed), *more, "--resume")
    assert r.exit_code == 0, r.output
    a, b = load_file(whole / "weights.safetensors"), load_file(killed / "weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _child_fit(data: Path, out: Path) -> None:
    """Run `anomalyqc fit draem` and SIGKILL this process after batch 1 of epoch 2."""
    from typer.main import get_command

    from anomalyqc import cli

    report = cli._Bars.__call__

    def killing(self, description: str, completed: int, total: int | None) -> None:
        if "epoch 2/" in description and completed == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        report(self, description, completed, total)

    cli._Bars.__call__ = killing  # type: ignore[method-assign]
    get_command(cli.app)(_fit_args(data, out) + ["--epochs", "2", "--set", "checkpoint_every=1"])


if __name__ == "__main__":  # the kill test's child: python tests/test_draem.py DATA OUT
    torch.set_num_threads(1)
    _child_fit(Path(sys.argv[1]), Path(sys.argv[2]))
