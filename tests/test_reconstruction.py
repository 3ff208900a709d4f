"""GANomaly and ResGANAD (models/reconstruction.py, models/ganomaly, models/resganad): the
thesis's losses on known inputs, fit -> save -> load -> predict, and the CLI end to end with
a kill and --resume. Tiny sizes (32x32, stems of 4 filters, 2 stages, 1-2 epochs).

This file doubles as the script the kill test starts in another process:
`python tests/test_reconstruction.py fit DETECTOR DATA OUT` runs `anomalyqc fit` and kills
itself (SIGKILL) after the first batch of the second epoch.
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
from safetensors.torch import load_file

from anomalyqc.errors import ConfigError
from anomalyqc.models import Ganomaly, Resganad, detector_class
from anomalyqc.models.ganomaly.model import GanomalyConfig, encoder_loss
from anomalyqc.models.ganomaly.model import contextual_loss as ganomaly_con
from anomalyqc.models.resganad.model import ResganadConfig, minmax, noise_loss
from anomalyqc.models.resganad.model import contextual_loss as resganad_con
from anomalyqc.nets import Autoencoder, flops_per_input, resganad_config
from anomalyqc.nets.blocks import stage
from anomalyqc.synth.perlin import PerlinSynthesizer
from anomalyqc.training.log import read_log
from anomalyqc.types import Batch

HERE = Path(__file__)
TINY = {"image_size": 32, "width": 4, "stages": 2, "epochs": 1, "batch_size": 4,
        "loss_curves": False}
TINY_RESGANAD = {**TINY, "blocks": 1, "convs": 2}
CLI_TINY = ["--image-size", "32", "--width", "4", "--batch-size", "4", "--set", "stages=2",
            "--set", "loss_curves=false"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    """Smooth gray blobs: something a tiny autoencoder can partly learn."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    centres = torch.rand(n, 2, generator=g) - 0.5
    r2 = (yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2
    return (0.2 + 0.6 * torch.exp(-4 * r2))[:, None]


# ------------------------------------------------------------------------------- losses
def test_ganomaly_contextual_and_encoder_losses_are_eq_8_4():
    x = torch.full((2, 1, 16, 16), 0.5)
    assert torch.allclose(ganomaly_con(x, x), torch.zeros(2), atol=1e-6)  # L1 0, SSIM 1
    y = x + 0.1
    # a constant shift: L1 = 0.1; SSIM of two flat images falls by the luminance term only
    ssim = (2 * 0.5 * 0.6 + 1e-4) / (0.5**2 + 0.6**2 + 1e-4)
    assert torch.allclose(ganomaly_con(x, y, 1.0, 0.0), torch.full((2,), 0.1), atol=1e-6)
    assert torch.allclose(ganomaly_con(x, y, 0.0, 1.0), torch.full((2,), 1 - ssim), atol=1e-4)
    assert torch.allclose(ganomaly_con(x, y, 1.0, 1.0), torch.full((2,), 0.1 + 1 - ssim),
                          atol=1e-4)
    z = torch.zeros(2, 3, 2, 2)
    assert torch.allclose(encoder_loss(z, z + 2.0), torch.full((2,), 4.0))


def test_resganad_contextual_loss_is_huber_plus_ssim_eq_8_12():
    x = torch.full((2, 1, 16, 16), 0.5)
    y = x + 0.1
    ssim = (2 * 0.5 * 0.6 + 1e-4) / (0.5**2 + 0.6**2 + 1e-4)
    huber = 0.5 * 0.1**2  # |d| < delta = 1: the quadratic branch
    assert resganad_con(x, y, 2.0, 1.0) == pytest.approx(2 * huber + (1 - ssim), abs=1e-4)
    big = torch.zeros_like(x) + 3.0  # |d| = 2.5 > delta: the linear branch, delta (|d| - delta/2)
    assert resganad_con(x, big, 1.0, 0.0) == pytest.approx(2.5 - 0.5, abs=1e-5)


def test_noise_loss_is_zero_when_the_clean_image_is_restored_under_the_mask():
    x = images(4)
    p = PerlinSynthesizer(probability=1.0)(x, generator=torch.Generator().manual_seed(0))
    assert bool(p.applied.all())
    # eq. 8.10 with X_hat = X: |(1-b) M X - M X*| = b N exactly, so L_nse = 0
    assert noise_loss(x, p.images, p.mask, p.noise, p.beta) == pytest.approx(0, abs=1e-10)
    # reproducing the perturbed input instead (an autoencoder that copies) is penalised
    copying = noise_loss(p.images, p.images, p.mask, p.noise, p.beta)
    assert copying > 1e-6
    # outside the mask the loss does not look: any X_hat there costs nothing
    off_mask = x + (1 - p.mask) * 0.3
    assert noise_loss(off_mask, p.images, p.mask, p.noise, p.beta) == pytest.approx(0, abs=1e-10)
    # by hand: a 2x2 blob of N = 0.8 on X = 0.4 with beta = 0.6, so X* = 0.64 there; an X_hat
    # of 0.45 gives |0.4 * 0.45 - 0.64| = 0.46 against beta N = 0.48: (0.02)^2 on 4 of 16 px
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1
    clean = torch.full((1, 1, 4, 4), 0.4)
    n = 0.8 * mask
    beta = torch.tensor([0.6])
    perturbed = (1 - mask) * clean + 0.4 * mask * clean + 0.6 * n
    assert noise_loss(clean + 0.05, perturbed, mask, n, beta) == pytest.approx(0.02**2 * 4 / 16,
                                                                                rel=1e-5)
    no_noise = noise_loss(clean + 0.05, clean, torch.zeros_like(mask), 0 * n, torch.zeros(1))
    assert no_noise == 0  # an unperturbed image (M = 0, N = 0, beta = 0) adds nothing


def test_heatmap_is_min_max_normalised_per_image_eq_8_16():
    m = torch.stack([torch.linspace(2, 4, 16).view(1, 4, 4), torch.full((1, 4, 4), 7.0)])
    out = minmax(m)
    assert out[0].min() == 0 and out[0].max() == 1
    assert torch.allclose(out[0], (m[0] - 2) / 2)
    assert torch.all(out[1] == 0)  # a flat map: 0, not NaN


def test_resganad_defaults_are_the_preset_and_the_preset_widens_where_it_halves():
    assert Resganad(channels=1).net_config() == resganad_config()
    cfg = resganad_config(width=4, image_size=32)
    ae = Autoencoder(cfg)
    x = torch.rand(1, 1, 32, 32)
    widths = [m.out_channels for m in ae.encoder.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths[0] == 4 and cfg.feature_shape == (64, 2, 2)  # 4 stages: 8, 16, 32, 64
    # a "last" stage keeps its input width until its resampling block
    s = stage(8, 16, 3, "down", widen="last")
    assert [b.body[0].out_channels for b in s] == [8, 8, 16]
    assert tuple(s(torch.rand(1, 8, 8, 8)).shape) == (1, 16, 4, 4)
    # narrower bodies cost less than widening first (the 574 vs 342 GFLOP of the preset)
    first = Autoencoder(resganad_config(width=4, image_size=32, widen="first"))
    assert flops_per_input(ae, x) < flops_per_input(first, x)


@pytest.mark.parametrize("module", ["anomalyqc.training", "anomalyqc.models",
                                    "anomalyqc.models.reconstruction", "anomalyqc.distributed"])
def test_each_package_imports_first_in_a_fresh_process(module):
    # training -> distributed -> models -> reconstruction -> training: no partial imports
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1] / "src")}
    r = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]


# --------------------------------------------------------------------- fit and predict
@pytest.mark.parametrize(("cls", "params"), [(Ganomaly, TINY), (Resganad, TINY_RESGANAD)])
def test_fit_predict_save_load_round_trip(cls, params, tmp_path):
    x = images(8)
    det = cls(params).fit([Batch.from_images(x)])
    assert det.fitted and det.config.channels == 1
    assert det.fit_report["epochs_run"] == 1 and det.fit_report["seconds_per_epoch"] > 0
    pred = det.predict(x[:3])
    assert pred.score.shape == (3,) and pred.anomaly_map.shape == (3, 1, 32, 32)
    assert torch.isfinite(pred.score).all() and torch.isfinite(pred.anomaly_map).all()
    assert pred.reconstruction is not None and pred.reconstruction.shape == (3, 1, 32, 32)
    if cls is Resganad:  # phi = 1 - SSIM(X, X_hat)
        from anomalyqc.models.reconstruction import ssim_per_image

        assert torch.allclose(pred.score, 1 - ssim_per_image(x[:3], pred.reconstruction),
                              atol=1e-5)
    det.save(tmp_path / "run")
    assert not any(p.suffix == ".pt" or p.suffix == ".pkl" for p in (tmp_path / "run").iterdir())
    names = set(load_file(tmp_path / "run" / "weights.safetensors"))
    assert any(n.startswith("generator.") for n in names)
    assert any(n.startswith("discriminator.") for n in names)
    loaded = cls.load(tmp_path / "run")
    again = loaded.predict(x[:3])
    assert torch.equal(again.score, pred.score)
    assert torch.equal(again.anomaly_map, pred.anomaly_map)


def test_ganomaly_reports_both_scores_and_the_score_parameter_picks_one():
    x = images(8)
    det = Ganomaly(TINY).fit([Batch.from_images(x)])
    pred = det.predict(x)
    assert set(pred.extras) == {"latent_score", "reconstruction_score"}
    assert torch.equal(pred.score, pred.extras["latent_score"])
    det.config.score = "reconstruction"
    pred2 = det.predict(x)
    assert torch.equal(pred2.score, pred.extras["reconstruction_score"])
    assert torch.allclose(pred.extras["reconstruction_score"],
                          ganomaly_con(x, pred.reconstruction), atol=1e-5)


def test_training_lowers_the_reconstruction_loss():
    x = images(16)
    det = Resganad({**TINY_RESGANAD, "epochs": 6, "val_fraction": 0, "lr": 2e-3})
    det.fit([Batch.from_images(x)])
    hist = det.train_result.history
    assert hist[-1]["train_con"] < hist[0]["train_con"]


def test_bad_parameters_and_inputs_are_one_line_errors():
    with pytest.raises(ConfigError, match="score"):
        Ganomaly(score="both")
    with pytest.raises(ConfigError, match="backbone"):
        Ganomaly(backbone="resnet18")
    with pytest.raises(ConfigError, match="divisible"):
        Ganomaly({**TINY, "image_size": 36, "stages": 3})  # refused before any image is read
    det = Ganomaly(TINY).fit([Batch.from_images(images(8))])
    with pytest.raises(ConfigError, match="expects images"):
        det.predict(torch.rand(2, 3, 32, 32))
    with pytest.raises(ConfigError, match="not fitted"):
        Ganomaly(TINY).predict(images(2))
    assert detector_class("ganomaly") is Ganomaly and detector_class("resganad") is Resganad


def test_preset_small_sets_defaults_that_explicit_keys_override():
    small = Resganad(preset="small", image_size=64).config
    assert all(getattr(small, k) == v for k, v in ResganadConfig.PRESETS["small"].items())
    assert Resganad(image_size=64).config.width == 64  # no preset: the thesis's width
    assert Resganad(preset="small", width=4, image_size=64).config.width == 4
    gan = Ganomaly(preset="small", image_size=64).config
    assert all(getattr(gan, k) == v for k, v in GanomalyConfig.PRESETS["small"].items())
    with pytest.raises(ConfigError, match="preset='tiny' is not one of \\['small'\\]"):
        Ganomaly(preset="tiny")
    # a saved run's params (preset and the values it gave) rebuild the same config
    assert Resganad(small.model_dump()).config == small


# ------------------------------------------------------------------------------ CLI
def _fit_args(detector: str, data: Path, out: Path) -> list[str]:
    extra = ["--set", "blocks=1"] if detector == "resganad" else []
    return ["fit", detector, "--data", str(data), "--out", str(out), *CLI_TINY, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("detector", ["ganomaly", "resganad"])
def test_cli_fit_evaluate_predict(detector, tiny_vials, tmp_path):
    from conftest import invoke, run_commands_work, stdout_json

    run = tmp_path / detector
    r = invoke(*_fit_args(detector, tiny_vials, run), "--epochs", 2)
    assert r.exit_code == 0, r.output
    info = stdout_json(r.output)
    assert info["detector"] == detector and info["epochs_run"] == 2
    assert info["seconds_per_epoch"] > 0 and math.isfinite(info["best_validation_loss"])
    assert (run / "training" / "log.csv").is_file() and info["training_folder"] == "training"
    assert json.loads((run / "config.json").read_text())["params"]["epochs"] == 2
    run_commands_work(run, tiny_vials, tmp_path)


def test_cli_refusals(tiny_vials, tmp_path):
    from conftest import invoke

    r = invoke("fit", "padim", "--data", tiny_vials, "--out", tmp_path / "p", "--resume")
    assert r.exit_code == 2 and "--resume" in r.output
    r = invoke(*_fit_args("ganomaly", tiny_vials, tmp_path / "g"), "--set", "epochs=3")
    assert r.exit_code == 2 and "--epochs" in r.output
    r = invoke(*_fit_args("ganomaly", tiny_vials, tmp_path / "g"), "--backbone", "resnet18")
    assert r.exit_code == 2 and "backbone" in r.output


@pytest.mark.slow
def test_cli_budget_stops_training_and_resume_overwrite_continues_it(tiny_vials, tmp_path):
    from conftest import invoke, stdout_json

    run = tmp_path / "g"
    # 12 training strips, 1 held out, 11 in batches of 4: 3 steps an epoch; a budget of 4
    # steps stops inside epoch 2 of 3
    r = invoke(*_fit_args("ganomaly", tiny_vials, run), "--epochs", 3, "--set", "max_steps=4")
    assert r.exit_code == 0, r.output
    info = stdout_json(r.output)
    assert (info["stopped_by"], info["steps"], info["epochs_run"]) == ("max_steps", 4, 1)
    assert info["epochs_reached"] == pytest.approx(4 / 3, abs=1e-3)
    assert "stopped by its budget (max_steps)" in r.output
    r = invoke(*_fit_args("ganomaly", tiny_vials, run), "--epochs", 3, "--resume")
    assert r.exit_code == 2 and "--overwrite" in r.output  # the finished run is kept
    r = invoke(*_fit_args("ganomaly", tiny_vials, run), "--epochs", 3, "--resume", "--overwrite",
               "--set", "max_minutes=60")
    assert r.exit_code == 0, r.output
    info = stdout_json(r.output)
    assert (info["stopped_by"], info["steps"], info["epochs_run"]) == (None, 9, 3)
    assert "budget" not in r.output.split("}")[-1]
    stops = [x for x in read_log(run / "training" / "log.csv") if x["phase"] == "stop"]
    assert [x["step"] for x in stops] == ["4"]  # the log keeps where the budget stopped it


def _child_fit(detector: str, data: Path, out: Path) -> None:
    """Run `anomalyqc fit` and SIGKILL this process after batch 1 of epoch 2."""
    from typer.main import get_command

    from anomalyqc import cli

    report = cli._Bars.__call__

    def killing(self, description: str, completed: int, total: int | None) -> None:
        if "epoch 2/" in description and completed == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        report(self, description, completed, total)

    cli._Bars.__call__ = killing  # type: ignore[method-assign]
    get_command(cli.app)(_fit_args(detector, data, out) +
                         ["--epochs", "2", "--set", "checkpoint_every=1"])


@pytest.mark.slow
@pytest.mark.parametrize("detector", ["ganomaly", "resganad"])
def test_cli_killed_then_resumed_matches_the_uninterrupted_run(detector, tiny_vials, tmp_path):
    from conftest import invoke

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = invoke(*_fit_args(detector, tiny_vials, whole), "--epochs", 2, "--set",
               "checkpoint_every=1")
    assert r.exit_code == 0, r.output
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, str(HERE), "fit", detector, str(tiny_vials),
                            str(killed)], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not killed.exists()  # the run folder appears only complete
    # the checkpoints live beside it, where the kill cannot take them with the temporary folder
    meta = json.loads((tmp_path / "killed.training" / "checkpoint" / "checkpoint.json")
                      .read_text())
    assert meta["progress"]["epoch"] == 1  # stopped inside the second epoch
    r = invoke(*_fit_args(detector, tiny_vials, killed), "--epochs", 2, "--set",
               "checkpoint_every=1")
    assert r.exit_code == 2 and "--resume" in r.output  # never silently restarts
    r = invoke(*_fit_args(detector, tiny_vials, killed), "--epochs", 2, "--set",
               "checkpoint_every=1", "--resume")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "killed.training").exists()  # moved into the run
    assert (killed / "training" / "checkpoint" / "checkpoint.json").is_file()
    a, b = load_file(whole / "weights.safetensors"), load_file(killed / "weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # same config, same weights: the same model id
    assert json.loads((whole / "manifest.json").read_text())["model_id"] == \
        json.loads((killed / "manifest.json").read_text())["model_id"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "fit":
        _child_fit(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))


def test_focal_loss_down_weights_easy_pixels():
    from anomalyqc.models.reconstruction import focal_loss

    target = torch.tensor([[1.0, 0.0]])
    easy = torch.tensor([[0.95, 0.05]])
    hard = torch.tensor([[0.6, 0.4]])
    # gamma = 0 is plain binary cross-entropy
    bce = torch.nn.functional.binary_cross_entropy(hard, target)
    assert torch.allclose(focal_loss(hard, target, gamma=0.0), bce)
    # gamma = 2 shrinks the easy pixels' loss far more than the hard ones'
    ratio_easy = focal_loss(easy, target, 2.0) / focal_loss(easy, target, 0.0)
    ratio_hard = focal_loss(hard, target, 2.0) / focal_loss(hard, target, 0.0)
    assert ratio_easy < 0.01 < ratio_hard
    # weight restricts the mean to the weighted pixels
    w = torch.tensor([[1.0, 0.0]])
    only_first = focal_loss(hard[:, :1], target[:, :1], 2.0)
    assert torch.allclose(focal_loss(hard, target, 2.0, weight=w), only_first)


def test_resganad_maps_compare_across_images_unless_normalised():
    """The default map (smoothed 1 - SSIM) keeps its scale across images, so a pixel
    threshold means the same on every image; normalise_map gives the thesis's display map."""
    from anomalyqc.models.reconstruction import smooth_map, ssim_map

    x = images(8)
    det = Resganad(TINY_RESGANAD).fit([Batch.from_images(x)])
    # a test image far from the training images, and one of them
    odd = x[:2].clone()
    odd[0, :, 8:24, 8:24] = 1.0 - odd[0, :, 8:24, 8:24]
    pred = det.predict(odd)
    expected = smooth_map((1 - ssim_map(odd, pred.reconstruction)).mean(1, keepdim=True),
                          det.config.smoothing_sigma)
    assert torch.allclose(pred.anomaly_map, expected, atol=1e-5)
    # the maps' peaks differ between images (no per-image scaling)
    peaks = pred.anomaly_map.flatten(1).amax(1)
    assert not torch.allclose(peaks, torch.ones(2))
    det.config.heatmap = "difference"
    diff = det.predict(odd).anomaly_map
    assert torch.allclose(diff, smooth_map((odd - pred.reconstruction).abs().mean(1, keepdim=True),
                                           det.config.smoothing_sigma), atol=1e-5)
    det.config.normalise_map = True
    shown = det.predict(odd).anomaly_map
    assert torch.allclose(shown.flatten(1).amax(1), torch.ones(2))
    assert torch.allclose(shown.flatten(1).amin(1), torch.zeros(2))


@pytest.mark.parametrize("name", ["draem", "grdnet"])
def test_small_preset_of_the_u_net_detectors_is_smaller_and_trains(name):
    from anomalyqc.models import detector_class

    cls = detector_class(name)
    small, full = cls(preset="small", image_size=64, channels=1), cls(image_size=64, channels=1)
    small._build()
    full._build()

    def count(d):
        return sum(p.numel() for net in d.nets.values() for p in net.parameters())

    assert count(small) * 10 < count(full)
    assert small.config.lr > full.config.lr
    det = cls(preset="small", image_size=32, epochs=1, batch_size=4, val_fraction=0.0)
    det.fit([Batch.from_images(images(8))])
    assert torch.isfinite(det.predict(images(2)).score).all()


def test_adversarial_loss_is_feature_matching_and_leaves_the_discriminator_untouched() -> None:
    """L_adv = ||f(X) - f(X_hat)||^2 with D run on each half alone (GANomaly's code): the
    gradient reaches the generator's output only, D's weights get none and stay trainable."""
    from torch import nn

    from anomalyqc.models.reconstruction import adversarial_loss
    from anomalyqc.nets import Discriminator
    from anomalyqc.training.interface import StepContext

    torch.manual_seed(0)
    d = Discriminator(image_size=16, base_width=4, stages=2, blocks=1, convs=1)
    ctx = StepContext({"discriminator": d}, 0, 0, torch.Generator().manual_seed(0),
                      torch.device("cpu"))
    x = torch.rand(3, 1, 16, 16)
    x_hat = torch.rand(3, 1, 16, 16, requires_grad=True)
    loss = adversarial_loss(ctx, x, x_hat)
    with torch.no_grad():
        want = nn.functional.mse_loss(d(x_hat)[1], d(x)[1])
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5) and float(loss.detach()) > 0
    loss.backward()
    assert x_hat.grad is not None and float(x_hat.grad.abs().sum()) > 0
    assert all(p.grad is None and p.requires_grad for p in d.parameters())
