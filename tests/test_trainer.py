"""The trainer (anomalyqc.training) on two small real models defined here: a conv autoencoder
with an L2 loss, and a GAN (generator with dropout, discriminator with batch norm) that
alternates discriminator and generator steps. 16x16 images, a few steps.

This file doubles as the script the kill/resume and torchrun tests start in other processes:
`python tests/test_trainer.py run|ddp|drift OUT [KILL_EPOCH KILL_BATCH]`.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from anomalyqc.errors import ConfigError, DataError, ModelFileError
from anomalyqc.training import (
    CosineRestarts,
    OptimGroup,
    Plateau,
    Schedule,
    StepContext,
    Trainable,
    Trainer,
    augment_batch,
    loss_curves_figure,
    plot_loss_curves,
)
from anomalyqc.training import checkpoint as ckpt
from anomalyqc.training.augment import warp_batch
from anomalyqc.training.devices import resolve_device, resolve_precision
from anomalyqc.training.log import CsvLog, read_log
from anomalyqc.training.replicas import check_replicas, differences, weights_digest
from anomalyqc.training.sampling import epoch_batches, split_indices
from anomalyqc.types import Batch, Sample

S = 16
HERE = Path(__file__).resolve()
# Deterministic cuBLAS, for the same tests on a GPU (device "auto"); read when CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


# ------------------------------------------------------------------------- test models
class TinyAE(Trainable):
    """Conv autoencoder, L2 reconstruction loss."""

    monitor = "loss"

    def __init__(self, seed: int = 0, lr: float = 1e-2) -> None:
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.Sigmoid())
        self.lr = lr

    def networks(self) -> dict[str, nn.Module]:
        return {"ae": self.net}

    def optimizer_groups(self) -> dict[str, OptimGroup]:
        return {"ae": OptimGroup(("ae",), self.lr)}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        with ctx.autocast():
            loss = F.mse_loss(ctx.nets["ae"](batch.image).float(), batch.image)
        ctx.step("ae", loss)
        return {"loss": loss.item()}

    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        return {"loss": F.mse_loss(ctx.nets["ae"](batch.image), batch.image).item()}


class TinyGAN(Trainable):
    """Generator (an autoencoder with dropout) and a discriminator (batch norm), alternating
    a discriminator step and a generator step; the input noise comes from ctx.generator."""

    monitor = "rec"

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.g = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Dropout(0.2),
                               nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.Sigmoid())
        self.d = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
                               nn.Conv2d(8, 1, 8))

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.g, "discriminator": self.d}

    def optimizer_groups(self) -> dict[str, OptimGroup]:
        return {"generator": OptimGroup(("generator",), 2e-3, (0.5, 0.999)),
                "discriminator": OptimGroup(("discriminator",), 1e-3, (0.5, 0.999))}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        g, d = ctx.nets["generator"], ctx.nets["discriminator"]
        x = batch.image
        n = len(x)
        noise = 0.05 * torch.randn(x.shape, generator=ctx.generator, device=x.device)
        with ctx.autocast():
            fake = g(x + noise)
            logits = d(torch.cat([x, fake.detach()])).flatten().float()
            target = torch.cat([torch.ones(n), torch.zeros(n)]).to(x.device)
            d_loss = F.binary_cross_entropy_with_logits(logits, target)
        ctx.step("discriminator", d_loss)
        with ctx.autocast():
            adv = F.binary_cross_entropy_with_logits(d(fake).flatten().float(),
                                                     torch.ones(n, device=x.device))
            rec = F.l1_loss(fake.float(), x)
            g_loss = adv + 50 * rec
        ctx.step("generator", g_loss)
        return {"d_loss": d_loss.item(), "g_loss": g_loss.item(), "rec": rec.item()}

    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        return {"rec": F.l1_loss(ctx.nets["generator"](batch.image), batch.image).item()}


class Samples(torch.utils.data.Dataset):
    """Structured 16x16 gray images (a gradient and a bright square), each with a defect
    mask and an ROI, as the readers produce them."""

    def __init__(self, n: int = 14, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, S), torch.linspace(0, 1, S), indexing="ij")
        self.items = []
        for i in range(n):
            a, b = (0.2 + 0.3 * torch.rand(2, generator=g)).tolist()
            img = 0.2 + a * xx + b * yy
            r, c = (torch.randint(2, S - 6, (2,), generator=g)).tolist()
            img[r: r + 4, c: c + 4] = 0.9
            mask = torch.zeros(1, S, S)
            mask[0, r: r + 4, c: c + 4] = 1
            roi = torch.zeros(1, S, S)
            roi[0, 2:-2, 4:-4] = 1
            self.items.append(Sample(image=img.clamp(0, 1)[None], mask=mask, roi=roi,
                                     path=f"{i}.png"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        return self.items[i]


def weights(model: Trainable) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().cpu().clone() for n, net in model.networks().items()
            for k, v in net.state_dict().items()}


# The kill/resume run: GAN, augmentations, cosine schedule with restarts, validation split,
# checkpoints every 4 steps; 12 training images in batches of 2 are 6 steps an epoch.
RESUME_CFG = {"epochs": 3, "batch_size": 2, "val_fraction": 0.15, "seed": 7,
              "schedule": "cosine", "cosine_period": 5, "rotation": math.pi / 8, "vflip": True,
              "checkpoint_every": 4, "log_every": 2, "loss_curves": False}
DDP_CFG = {"epochs": 2, "batch_size": 2, "val_fraction": 0.15, "seed": 3, "rotation": 0.3,
           "vflip": True, "log_every": 1, "loss_curves": False}


@pytest.fixture(autouse=True)
def _deterministic(one_thread):
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------------------- schedules
def test_plateau_reduces_by_e_to_minus_alpha_after_three_flat_epochs():
    p = Plateau(patience=3, alpha=0.1)
    factors = []
    for metric in [1.0, 0.5, 0.5, 0.6, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]:
        p.after_epoch(metric)
        factors.append(p.factor)
    e = math.exp(-0.1)
    # flat epochs 3, 4, 5 -> reduced after the 5th; improvement at 6; flat 7..9 and 10..12
    assert factors == pytest.approx([1, 1, 1, 1, e, e, e, e, e * e, e * e, e * e, e ** 3])
    q = Plateau()
    q.load_state(json.loads(json.dumps(p.state())))
    p.after_epoch(0.4), q.after_epoch(0.4)
    assert (q.factor, q.bad_epochs, q.best) == (p.factor, p.bad_epochs, p.best)


def test_cosine_restarts_at_a_third_of_the_previous_peak():
    c = CosineRestarts(period=4, restart_peak=1 / 3)
    seq = [c.factor]
    for _ in range(11):
        c.after_step()
        seq.append(c.factor)
    half = 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))
    expected = [p * f for p in (1, 1 / 3, 1 / 9) for f in (1, *half)]
    assert seq == pytest.approx(expected)
    floor = CosineRestarts(period=4, min_factor=0.1)
    assert floor.factor_at(2) == pytest.approx(0.1 + 0.9 * 0.5)
    with pytest.raises(ConfigError):
        CosineRestarts(period=0)


def test_constant_schedule_and_a_mismatched_state_is_refused():
    s = Schedule()
    s.after_step(), s.after_epoch(1.0)
    assert s.factor == 1.0
    with pytest.raises(ConfigError, match="plateau"):
        s.load_state(Plateau().state())


# ------------------------------------------------------------------------- augmentation
def _batch(n: int = 4) -> Batch:
    return Batch.collate([Samples(n)[i] for i in range(n)])


def test_rotation_by_a_quarter_turn_and_flip_are_exact_on_image_mask_and_roi():
    b = _batch()
    quarter = warp_batch(b, torch.full((4,), math.pi / 2, dtype=torch.float64), torch.ones(4))
    for t, r in ((quarter.image, b.image), (quarter.mask, b.mask), (quarter.roi, b.roi)):
        torch.testing.assert_close(t, torch.rot90(r, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    flipped = warp_batch(b, torch.zeros(4, dtype=torch.float64), -torch.ones(4))
    for t, r in ((flipped.image, b.image), (flipped.mask, b.mask), (flipped.roi, b.roi)):
        torch.testing.assert_close(t, torch.flip(r, dims=(2,)), atol=1e-5, rtol=0)
    both = warp_batch(b, torch.full((4,), math.pi / 2, dtype=torch.float64), -torch.ones(4))
    torch.testing.assert_close(both.image, torch.rot90(torch.flip(b.image, dims=(2,)), 1, dims=(2, 3)),
                               atol=1e-5, rtol=0)


def test_rotation_of_a_non_square_image_turns_pixels_not_a_sheared_grid():
    x = torch.rand(2, 1, 16, 32)
    b = Batch(image=x, label=torch.zeros(2, dtype=torch.int64))
    out = warp_batch(b, torch.full((2,), math.pi / 2, dtype=torch.float64), torch.ones(2)).image
    # the central 16x16 square turns in place
    torch.testing.assert_close(out[..., 8:24], torch.rot90(x[..., 8:24], 1, dims=(2, 3)),
                               atol=1e-5, rtol=0)


def test_augmentation_is_seeded_keeps_masks_binary_and_moves_them_with_the_image():
    b = _batch()
    b.image = b.mask.clone()  # an image that is its own mask: they must stay in step
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a1 = augment_batch(b, math.pi / 8, True, gen(1), padding="zeros")
    a2 = augment_batch(b, math.pi / 8, True, gen(1), padding="zeros")
    a3 = augment_batch(b, math.pi / 8, True, gen(2), padding="zeros")
    assert torch.equal(a1.image, a2.image) and torch.equal(a1.mask, a2.mask)
    assert not torch.equal(a1.image, a3.image)
    assert set(a1.mask.unique().tolist()) <= {0.0, 1.0} and set(a1.roi.unique().tolist()) <= {0, 1}
    assert not torch.equal(a1.mask, b.mask)
    # bilinear image and nearest mask agree wherever the image is clearly in or out
    sure = (a1.image < 0.25) | (a1.image > 0.75)
    assert torch.equal((a1.image[sure] > 0.5).float(), a1.mask[sure])
    assert augment_batch(b, 0.0, False, gen(1)) is b
    with pytest.raises(ConfigError, match="rotation"):
        augment_batch(b, 4.0, False, gen(1))


# ----------------------------------------------------------------------------- sampling
def test_split_and_epoch_order_are_seeded_and_ranks_share_an_epoch():
    tr, va = split_indices(20, 0.2, seed=1)
    assert (tr, va) == split_indices(20, 0.2, seed=1) and len(va) == 4
    assert sorted(tr + va) == list(range(20))
    assert split_indices(20, 0.2, seed=2) != (tr, va)
    e0, e1 = epoch_batches(tr, 3, 1, 0), epoch_batches(tr, 3, 1, 1)
    assert e0 == epoch_batches(tr, 3, 1, 0) and e0 != e1
    assert sorted(sum(e0, [])) == tr
    ranks = [epoch_batches(tr, 3, 1, 0, rank=r, world=3) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # the same number of steps everywhere
    seen = [i for r in ranks for b in r for i in b]
    assert set(seen) == set(tr) and len(seen) == 18  # 16 images padded to 3 x 6
    with pytest.raises(DataError, match="cannot be split"):
        split_indices(1, 0.5, 0)


# ------------------------------------------------------------------------ training runs
def test_autoencoder_trains_logs_validates_and_checkpoints(tmp_path):
    calls = []
    model, data = TinyAE(), Samples(14)
    r = Trainer({"epochs": 4, "batch_size": 4, "val_fraction": 0.15, "log_every": 1, "vflip": True},
                tmp_path,
                progress=lambda *a: calls.append(a), label="ae").fit(model, data)
    assert (r.epochs, r.steps, r.stopped_early) == (4, 12, False)  # 12 train images / 4
    assert r.history[-1]["train_loss"] < 0.9 * r.history[0]["train_loss"]
    assert r.history[-1]["val_loss"] < r.history[0]["val_loss"]
    rows = read_log(tmp_path / "log.csv")
    assert [x["phase"] for x in rows].count("val") == 4 and len(rows) == 16
    assert {"epoch", "step", "phase", "loss", "lr_ae", "seconds", "cpu_seconds"} <= set(rows[0])
    cpu = [float(x["cpu_seconds"]) for x in rows if x["phase"] == "train"]
    assert cpu == sorted(cpu) and cpu[0] > 0  # the first step's row has its own CPU time
    assert float(rows[0]["lr_ae"]) == 1e-2
    assert ("ae: epoch 1/4", 0, 3) in calls and ("ae: epoch 4/4", 3, 3) in calls
    files = {p.name for p in (tmp_path / "checkpoint").iterdir()}
    assert files == {"checkpoint.json", "state-000000012.safetensors", "best.safetensors"}
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    assert all(not n.training for n in model.networks().values())


def test_early_stopping_stops_and_restores_the_best_epoch(tmp_path):
    class Worsening(TinyAE):
        def validation_step(self, batch, ctx):  # the best epoch is the first
            return {"loss": 1.0 + ctx.epoch}

    model = Worsening()
    r = Trainer({"epochs": 10, "batch_size": 4, "early_stopping": 2, "loss_curves": False},
                tmp_path).fit(model, Samples(14))
    assert (r.epochs, r.stopped_early, r.best_epoch, r.best_metric) == (3, True, 1, 1.0)
    best = load_file(tmp_path / "checkpoint" / "best.safetensors")
    last, _ = ckpt.load_checkpoint(tmp_path / "checkpoint")
    for k, v in weights(model).items():
        k = k.removeprefix("ae.")
        assert torch.equal(v, best[f"ae.{k}"])
        assert not torch.equal(v, last[f"net.ae.{k}"])


def test_plateau_schedule_lowers_the_learning_rate_in_training(tmp_path):
    class Flat(TinyAE):
        def validation_step(self, batch, ctx):
            return {"loss": 1.0}

    Trainer({"epochs": 6, "batch_size": 6, "val_fraction": 0.15, "schedule": "plateau", "log_every": 2,
             "loss_curves": False}, tmp_path).fit(Flat(), Samples(14))
    lrs = [float(x["lr_ae"]) for x in read_log(tmp_path / "log.csv") if x["phase"] == "train"]
    # epoch 1 sets the best, epochs 2-4 are flat: epochs 5 and 6 run at e^-0.1
    assert lrs == pytest.approx([1e-2] * 4 + [1e-2 * math.exp(-0.1)] * 2)


def test_gan_alternates_and_both_networks_learn(tmp_path):
    model = TinyGAN()
    before = weights(model)
    r = Trainer({"epochs": 3, "batch_size": 4, "log_every": 1, "loss_curves": False},
                tmp_path).fit(model, Samples(14))
    after = weights(model)
    for name in ("generator.0.weight", "discriminator.0.weight", "discriminator.1.running_mean"):
        assert not torch.equal(before[name], after[name])
    assert r.history[-1]["train_rec"] < r.history[0]["train_rec"]
    assert {"lr_generator", "lr_discriminator", "d_loss", "g_loss"} <= set(
        read_log(tmp_path / "log.csv")[0])


def test_interface_mistakes_are_clear_errors(tmp_path):
    class WrongGroup(TinyAE):
        def optimizer_groups(self):
            return {"ae": OptimGroup(("encoder",), 1e-3)}

    class WrongStep(TinyAE):
        def training_step(self, batch, ctx):
            ctx.step("generator", ctx.nets["ae"](batch.image).mean())
            return {}

    class NoMonitor(TinyAE):
        monitor = "auroc"

    class Diverging(TinyAE):
        def training_step(self, batch, ctx):
            out = super().training_step(batch, ctx)
            return {"loss": out["loss"] if ctx.global_step < 2 else math.inf}

    cfg = {"epochs": 1, "batch_size": 4, "loss_curves": False}
    with pytest.raises(ConfigError, match="diverged: loss became inf at epoch 1, step 3"):
        Trainer({**cfg, "checkpoint_every": 1}, tmp_path / "d").fit(Diverging(), Samples(14))
    assert json.loads((tmp_path / "d" / "checkpoint" / "checkpoint.json").read_text())[
        "progress"]["step"] == 2
    with pytest.raises(ConfigError, match="'encoder'.*among \\['ae'\\]"):
        Trainer(cfg, tmp_path / "a").fit(WrongGroup(), Samples(8))
    with pytest.raises(ConfigError, match="optimizer 'generator'"):
        Trainer(cfg, tmp_path / "b").fit(WrongStep(), Samples(8))
    with pytest.raises(ConfigError, match="monitors 'auroc'"):
        Trainer({**cfg, "early_stopping": 2}, tmp_path / "c").fit(NoMonitor(), Samples(8))


# ---------------------------------------------------------------- checkpoints and resume
def _run(out: Path, kill: tuple[int, int] | None = None) -> TinyGAN:
    """The resume test's training run (also what the child process runs)."""
    model = TinyGAN(seed=1)

    def progress(desc: str, done: int, total: int | None) -> None:
        if kill and desc.startswith(f"train: epoch {kill[0]}/") and done == kill[1]:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9, mid-epoch, no clean-up

    Trainer(RESUME_CFG, out, progress=progress).fit(model, Samples(14), resume=True)
    return model


def _child(mode: str, *args: object, torchrun: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    if torchrun:
        env["CUDA_VISIBLE_DEVICES"] = ""  # two CPU processes over loopback (gloo)
        from anomalyqc.launch import TORCHRUN, free_port

        cmd = [*TORCHRUN, "--nnodes", "1", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), str(HERE), mode, *map(str, args)]
    else:
        cmd = [sys.executable, str(HERE), mode, *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_reaches_the_uninterrupted_weights(tmp_path):
    whole = _run(tmp_path / "whole")
    killed = _child("run", tmp_path / "killed", 2, 5)  # SIGKILL after step 5 of epoch 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    meta = json.loads((tmp_path / "killed" / "checkpoint" / "checkpoint.json").read_text())
    assert (meta["progress"]["epoch"], meta["progress"]["batch"], meta["progress"]["step"]) == \
        (1, 2, 8)  # the last checkpoint: step 8, two batches into the second epoch
    assert not any(p.suffix not in (".json", ".safetensors")
                   for p in (tmp_path / "killed" / "checkpoint").iterdir())  # no pickle
    resumed = _run(tmp_path / "killed")
    for k, v in weights(whole).items():
        assert torch.equal(v, weights(resumed)[k]), k
    # the log of the lost steps is not doubled: the same rows as the uninterrupted run's
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")}  # noqa: E731
                         for r in rows]
    assert drop(read_log(tmp_path / "killed" / "log.csv")) == \
        drop(read_log(tmp_path / "whole" / "log.csv"))


def test_resume_after_the_end_continues_with_more_epochs(tmp_path):
    cfg = {"batch_size": 4, "log_every": 1, "vflip": True, "loss_curves": False}
    five = TinyAE()
    Trainer({**cfg, "epochs": 5}, tmp_path / "five").fit(five, Samples(14))
    Trainer({**cfg, "epochs": 2}, tmp_path / "two").fit(TinyAE(), Samples(14))
    more = TinyAE(seed=9)  # the checkpoint's weights replace these
    r = Trainer({**cfg, "epochs": 5}, tmp_path / "two").fit(more, Samples(14), resume=True)
    assert r.epochs == 5 and len(r.history) == 5
    for k, v in weights(five).items():
        assert torch.equal(v, weights(more)[k])


def test_max_steps_stops_mid_epoch_and_a_larger_budget_resumes_to_the_same_weights(tmp_path):
    # 12 training images in batches of 4: 3 steps an epoch; the budget ends step 5, mid-epoch 2
    cfg = {"epochs": 3, "batch_size": 4, "val_fraction": 0.15, "log_every": 2,
           "restore_best": False, "loss_curves": False}
    whole = TinyGAN(seed=2)
    Trainer(cfg, tmp_path / "whole").fit(whole, Samples(14))
    cut = TinyGAN(seed=2)
    r = Trainer({**cfg, "max_steps": 5}, tmp_path / "cut").fit(cut, Samples(14))
    assert (r.steps, r.epochs, r.stopped_by, r.stopped_early) == (5, 1, "max_steps", False)
    meta = json.loads((tmp_path / "cut" / "checkpoint" / "checkpoint.json").read_text())
    assert (meta["progress"]["step"], meta["progress"]["batch"]) == (5, 2)  # step 5 saved
    stop = [x for x in read_log(tmp_path / "cut" / "log.csv") if x["phase"] == "stop"]
    assert [(x["step"], x["stopped_by"]) for x in stop] == [("5", "max_steps=5")]
    # the same budget again trains no further
    again = Trainer({**cfg, "max_steps": 5}, tmp_path / "cut").fit(TinyGAN(seed=9), Samples(14),
                                                                   resume=True)
    assert (again.steps, again.stopped_by) == (5, "max_steps")
    # past it, the run continues where it stopped and ends as the uninterrupted one
    more = TinyGAN(seed=9)
    r = Trainer(cfg, tmp_path / "cut").fit(more, Samples(14), resume=True)
    assert (r.steps, r.epochs, r.stopped_by) == (9, 3, None)
    for k, v in weights(whole).items():
        assert torch.equal(v, weights(more)[k]), k


def test_max_minutes_stops_on_the_wall_clock_after_a_whole_step(tmp_path):
    class Slow(TinyAE):
        def training_step(self, batch, ctx):
            time.sleep(0.05)
            return super().training_step(batch, ctx)

    # 0.005 min = 0.3 s at >= 0.05 s a step: at most 6 of the 30 steps (10 epochs x 3)
    r = Trainer({"epochs": 10, "batch_size": 4, "max_minutes": 0.005, "loss_curves": False},
                tmp_path).fit(Slow(), Samples(14))
    assert r.stopped_by == "max_minutes" and 1 <= r.steps <= 6 and r.seconds >= 0.3
    meta = json.loads((tmp_path / "checkpoint" / "checkpoint.json").read_text())
    assert meta["progress"]["step"] == r.steps  # the last step is the checkpoint
    assert read_log(tmp_path / "log.csv")[-1]["stopped_by"] == "max_minutes=0.005"
    r = Trainer({"epochs": 10, "batch_size": 4, "max_minutes": 0.01, "loss_curves": False},
                tmp_path).fit(Slow(), Samples(14), resume=True)
    assert r.stopped_by == "max_minutes" and r.seconds >= 0.6 and r.steps > \
        meta["progress"]["step"]


@pytest.mark.parametrize("improving", [True, False])
def test_a_budget_stop_keeps_the_last_weights_only_when_they_validate_best(tmp_path, improving):
    class Judged(TinyAE):
        def validation_step(self, batch, ctx):
            return {"loss": 1 / (1 + ctx.global_step) if improving else float(ctx.global_step)}

    model = Judged()
    cfg = {"epochs": 3, "batch_size": 4, "val_fraction": 0.15, "max_steps": 5,
           "loss_curves": False}
    r = Trainer(cfg, tmp_path).fit(model, Samples(14))  # 3 steps an epoch: stops mid-epoch 2
    assert (r.steps, r.best_epoch) == (5, 1)
    last, _ = ckpt.load_checkpoint(tmp_path / "checkpoint")
    best = load_file(tmp_path / "checkpoint" / "best.safetensors")
    for k, v in weights(model).items():
        assert torch.equal(v, last[f"net.{k}"] if improving else best[k]), k


def test_a_budget_reached_with_the_last_epoch_did_not_stop_the_run(tmp_path):
    r = Trainer({"epochs": 2, "batch_size": 4, "val_fraction": 0.15, "max_steps": 6,
                 "loss_curves": False}, tmp_path).fit(TinyAE(), Samples(14))
    assert (r.steps, r.epochs, r.stopped_by) == (6, 2, None)
    assert not any(x["phase"] == "stop" for x in read_log(tmp_path / "log.csv"))


def test_resume_refusals(tmp_path):
    cfg = {"epochs": 1, "batch_size": 4, "loss_curves": False}
    Trainer(cfg, tmp_path).fit(TinyAE(), Samples(8))
    with pytest.raises(ConfigError, match="resume=True"):
        Trainer(cfg, tmp_path).fit(TinyAE(), Samples(8))
    with pytest.raises(ConfigError, match=r"batch_size \(4 vs 2\)"):
        Trainer({**cfg, "batch_size": 2}, tmp_path).fit(TinyAE(), Samples(8), resume=True)
    with pytest.raises(DataError, match="trained on 8 images"):
        Trainer(cfg, tmp_path).fit(TinyAE(), Samples(9), resume=True)
    with pytest.raises(ModelFileError, match="optimizers"):
        Trainer(cfg, tmp_path).fit(TinyGAN(), Samples(8), resume=True)
    state = next((tmp_path / "checkpoint").glob("state-*.safetensors"))
    state.write_bytes(state.read_bytes()[:-4] + b"oops")
    with pytest.raises(ModelFileError, match="SHA-256"):
        Trainer(cfg, tmp_path).fit(TinyAE(), Samples(8), resume=True)


def test_a_save_cut_short_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint"
    ckpt.save_checkpoint(folder, 1, {"w": torch.ones(3)}, {"progress": {"step": 1}})
    # killed after the tensors of step 2 were written, before checkpoint.json named them
    save_file({"w": torch.zeros(3)}, folder / "state-000000002.safetensors")
    tensors, meta = ckpt.load_checkpoint(folder)
    assert meta["progress"]["step"] == 1 and torch.equal(tensors["w"], torch.ones(3))

    def broken(tensors, path):  # a full disk halfway through the tensor file
        Path(path).write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(folder, 3, {"w": torch.full((3,), 3.0)}, {"progress": {"step": 3}})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(folder)[1]["progress"]["step"] == 1
    ckpt.save_checkpoint(folder, 4, {"w": torch.full((3,), 4.0)}, {"progress": {"step": 4}})
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json",
                                                         "state-000000004.safetensors"]


def test_optimizer_state_round_trips_through_json_and_safetensors(tmp_path):
    model = TinyGAN()
    opt = torch.optim.Adam(model.g.parameters(), lr=1e-3, betas=(0.5, 0.999))
    model.g(torch.rand(2, 1, S, S)).mean().backward()
    opt.step()
    tensors: dict[str, torch.Tensor] = {}
    meta = json.loads(json.dumps(ckpt.encode(opt.state_dict(), "opt", tensors)))
    save_file(tensors, tmp_path / "t.safetensors")
    back = ckpt.decode(meta, load_file(tmp_path / "t.safetensors"))
    ref = opt.state_dict()
    assert back["param_groups"] == ref["param_groups"]  # betas stay a tuple, ids stay ints
    assert set(back["state"]) == set(ref["state"]) == {0, 1, 2, 3}
    for i, st in ref["state"].items():
        for k, v in st.items():
            assert torch.equal(back["state"][i][k], v)


def test_random_states_round_trip():
    state = ckpt.rng_tensors()
    first = torch.rand(3), np.random.rand(3), random.random()
    ckpt.restore_rng(ckpt.rng_from_bytes(ckpt.rng_to_bytes(state)))
    again = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2]


# -------------------------------------------------------------------------- processes
@pytest.mark.slow
def test_two_processes_keep_identical_replicas_and_rank_0_writes(tmp_path):
    r = _child("ddp", tmp_path, torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert set(w0) == set(w1) and "discriminator.1.running_mean" in w0
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert not torch.equal(w0["generator.0.weight"], weights(TinyGAN(seed=1))["generator.0.weight"])
    info = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    # each rank reports every rank's digest: the same pair, equal, and that of the weights
    digest = weights_digest({n: _holder(w0, n) for n in ("discriminator", "generator")})
    assert info[0]["digests"] == info[1]["digests"] == [digest, digest]
    # 12 training images: 6 per process, 3 steps of 2 an epoch, disjoint shards every epoch
    assert info[0]["steps"] == info[1]["steps"] == 6
    assert len(info[0]["seen"]) == 12 and not set(info[0]["seen"]) & set(info[1]["seen"])
    rows = read_log(tmp_path / "log.csv")
    assert len(rows) == 6 + 2  # one writer: a row per step and per epoch's validation
    tensors, meta = ckpt.load_checkpoint(tmp_path / "checkpoint")
    assert meta["world"] == 2 and {"rng.0.torch_cpu", "rng.1.torch_cpu"} <= set(tensors)


def _ddp_main(out: Path) -> None:
    """One torchrun worker: train the GAN, then save this replica's weights."""
    seen: list[str] = []

    class Recording(TinyGAN):
        def training_step(self, batch, ctx):
            seen.extend(f"{ctx.epoch}:{p}" for p in batch.path)
            return super().training_step(batch, ctx)

    model = Recording(seed=1)
    r = Trainer(DDP_CFG, out).fit(model, Samples(14))
    rank = int(os.environ["RANK"])
    save_file({k: v.contiguous() for k, v in weights(model).items()}, out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps({"steps": r.steps, "seen": seen,
                                                      "digests": r.weights_sha256}))


def _holder(tensors: dict[str, torch.Tensor], name: str) -> nn.Module:
    """A module whose state_dict is the saved tensors of network `name`, for digests."""

    class Holder(nn.Module):
        def state_dict(self, *args, **kwargs):  # type: ignore[override]
            head = f"{name}."
            return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}

    return Holder()


class RankDrift(TinyGAN):
    """A model that nudges a generator weight on rank 1 only, outside the optimizer (the
    kind of bug DDP does not undo): the trainer must stop the run, not save either replica."""

    def training_step(self, batch, ctx):
        out = super().training_step(batch, ctx)
        if int(os.environ["RANK"]) == 1 and ctx.global_step == 1:
            with torch.no_grad():
                self.g[0].weight[0, 0, 0, 0] += 1e-6
        return out


@pytest.mark.slow
def test_two_processes_that_diverge_stop_with_a_replica_error(tmp_path):
    r = _child("drift", tmp_path, torchrun=True)
    assert r.returncode != 0
    assert "the training processes diverged in epoch 1: network 'generator' (rank 1)" \
        in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "finished").exists()


def test_replica_differences_name_the_networks_and_ranks():
    a, b = bytes(32), bytes([1] * 32)
    same = {"d": a, "g": a}
    assert differences([same, same, same]) == []
    assert differences([same, {"d": a, "g": b}, {"d": b, "g": b}]) == \
        ["'d' (rank 2)", "'g' (ranks 1, 2)"]
    net = nn.Linear(2, 2)
    before = weights_digest({"n": net})
    assert before == check_replicas({"n": net}, "now")[0]  # one process: its own digest
    with torch.no_grad():
        net.bias[0] += 1e-7
    assert weights_digest({"n": net}) != before


def _drift_main(out: Path) -> None:
    Trainer(DDP_CFG, out).fit(RankDrift(seed=1), Samples(14))
    (out / "finished").write_text("the run should have stopped")


# ------------------------------------------------------------------- devices, extras
def test_device_and_precision_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == (None, False)
    with pytest.raises(ConfigError, match="needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu0")
    if torch.cuda.is_available():
        assert resolve_device("auto", 0) == torch.device("cuda", 0)
        assert resolve_precision("auto", torch.device("cuda", 0)) == (torch.float16, True)
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_channels_last_trains_in_that_memory_format(tmp_path):
    model = TinyAE()
    r = Trainer({"epochs": 1, "batch_size": 4, "channels_last": True, "loss_curves": False},
                tmp_path).fit(model, Samples(8))
    assert model.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert math.isfinite(r.history[0]["train_loss"])


def test_gradient_clipping_limits_the_update(tmp_path):
    cfg = {"epochs": 1, "batch_size": 4, "val_fraction": 0, "loss_curves": False}
    init = weights(TinyAE())
    free, clipped = TinyAE(), TinyAE()
    Trainer(cfg, tmp_path / "free").fit(free, Samples(8))
    Trainer({**cfg, "grad_clip": 1e-12}, tmp_path / "clip").fit(clipped, Samples(8))
    moved = lambda m: max(float((v - init[k]).abs().max()) for k, v in weights(m).items())  # noqa: E731
    # Adam normalises the step: a gradient clipped far below eps moves a weight by ~lr * 1e-4
    assert moved(free) > 1e-3 and moved(clipped) < 1e-5


def test_loader_workers_do_not_change_the_run(tmp_path):
    cfg = {"epochs": 2, "batch_size": 4, "vflip": True, "loss_curves": False}
    a, b = TinyAE(), TinyAE()
    Trainer(cfg, tmp_path / "a").fit(a, Samples(10))
    Trainer({**cfg, "num_workers": 1}, tmp_path / "b").fit(b, Samples(10))
    for k, v in weights(a).items():
        assert torch.equal(v, weights(b)[k])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_precision_on_the_gpu_checkpoints_the_gradient_scaler(tmp_path):
    model = TinyGAN()
    r = Trainer({"epochs": 2, "batch_size": 4, "loss_curves": False}, tmp_path).fit(model, Samples(14))
    assert next(model.g.parameters()).is_cuda and math.isfinite(r.history[-1]["train_rec"])
    _, meta = ckpt.load_checkpoint(tmp_path / "checkpoint")
    assert meta["scaler"]["scale"] > 0 and meta["config"]["precision"] == "auto"
    more = TinyGAN(seed=5)
    Trainer({"epochs": 3, "batch_size": 4, "loss_curves": False}, tmp_path).fit(
        more, Samples(14), resume=True)
    assert math.isfinite(float(next(more.g.parameters()).sum()))


def test_tensorboard_is_optional(tmp_path):
    cfg = {"epochs": 1, "batch_size": 4, "tensorboard": True, "log_every": 1, "loss_curves": False}
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            Trainer(cfg, tmp_path).fit(TinyAE(), Samples(8))
        assert not (tmp_path / "log.csv").exists()
    else:
        Trainer(cfg, tmp_path).fit(TinyAE(), Samples(8))
        assert any((tmp_path / "tensorboard").iterdir())


def test_csv_log_grows_its_header_and_resumes_at_a_row_count(tmp_path):
    log = CsvLog(tmp_path / "log.csv")
    log.start()
    log.append({"epoch": 1, "step": 1, "phase": "train", "loss": 0.5})
    log.append({"epoch": 1, "step": 2, "phase": "train", "loss": 0.25})
    log.append({"epoch": 1, "step": 2, "phase": "val", "val": 0.125})  # a new column
    rows = read_log(tmp_path / "log.csv")
    assert [r["loss"] for r in rows] == ["0.5", "0.25", ""] and rows[2]["val"] == "0.125"
    with open(tmp_path / "log.csv", "a") as fh:
        fh.write("1,3,train,0.1")  # a row cut short by a kill
    assert len(read_log(tmp_path / "log.csv")) == 3
    again = CsvLog(tmp_path / "log.csv")
    again.start(rows=2, columns=log.columns)
    again.append({"epoch": 1, "step": 3, "phase": "train", "loss": 0.2})
    assert [r["step"] for r in read_log(tmp_path / "log.csv")] == ["1", "2", "3"]
    assert not CsvLog(tmp_path / "other.csv", enabled=False).path.exists()


def test_loss_curves_png_from_the_log(tmp_path):
    log = CsvLog(tmp_path / "log.csv")
    log.start()
    for step in range(1, 7):
        log.append({"epoch": 1 + step // 4, "step": step, "phase": "train",
                    "loss": 1.0 / step, "lr_ae": 1e-3, "seconds": 0.5 * step,
                    "cpu_seconds": 0.9 * step})  # clocks: not drawn as curves
        if step % 3 == 0:
            log.append({"epoch": step // 3, "step": step, "phase": "val", "loss": 1.2 / step})
    png = plot_loss_curves(tmp_path / "log.csv", tmp_path / "curves.png", "ae")
    import cv2

    img = cv2.imread(str(png))
    assert img is not None and img.shape == (600, 800, 3)
    fig = loss_curves_figure(read_log(tmp_path / "log.csv"))
    loss_ax, lr_ax = fig.axes
    labels = [line.get_label() for line in loss_ax.lines]
    assert labels == ["train loss", "val loss"] and len(loss_ax.lines[1].get_xdata()) == 2
    assert [line.get_label() for line in lr_ax.lines] == ["ae"]
    (tmp_path / "empty.csv").write_text("epoch,step,phase\n")
    with pytest.raises(DataError, match="no training rows"):
        plot_loss_curves(tmp_path / "empty.csv", tmp_path / "x.png")


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "run":
        _run(out, (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else None)
    elif mode == "ddp":
        _ddp_main(out)
    elif mode == "drift":
        _drift_main(out)
