"""Training parameters (the `--set` keys of a trainable detector's fit)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Changing these between a run and its resume would not continue the same run.
RESUME_MUST_MATCH = ("batch_size", "val_fraction", "seed", "schedule", "plateau_patience",
                     "plateau_alpha", "cosine_period", "cosine_restart_peak", "rotation", "vflip",
                     "padding", "drop_last", "precision")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1)
    # stop after this many training steps in all (a trial or timing run); a run stopped
    # mid-epoch is checkpointed there without that epoch's validation, and a resume with a
    # higher limit (or none) continues it. None: the epochs alone decide.
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    drop_last: bool = False
    num_workers: int = Field(0, ge=0)
    # schedules: see anomalyqc.training.schedules
    schedule: Literal["constant", "plateau", "cosine"] = "constant"
    plateau_patience: int = Field(3, ge=1)  # thesis 9.1: 3 flat epochs
    plateau_alpha: float = Field(0.1, gt=0)  # LR_k = LR_(k-1) e^-alpha
    plateau_threshold: float = Field(1e-4, ge=0)  # relative improvement that counts
    # steps per cycle; None: the whole run (then more epochs on resume stretch the cycle)
    cosine_period: int | None = Field(None, ge=1)
    cosine_restart_peak: float = Field(1 / 3, gt=0, le=1)  # thesis 10.5.3: a third
    min_lr_factor: float = Field(0.0, ge=0, le=1)
    # early stopping on the detector's monitored metric; None: never
    early_stopping: int | None = Field(None, ge=1)
    restore_best: bool = True  # end with the weights of the best validation epoch
    # augmentation: rotation within +-rotation radians (pi/8 vials, pi/2 MVTec), vertical flips
    rotation: float = Field(0.0, ge=0, le=math.pi)
    vflip: bool = False
    padding: Literal["zeros", "border", "reflection"] = "reflection"
    # checkpoints every epoch and every N steps (None: epochs only)
    checkpoint_every: int | None = Field(None, ge=1)
    log_every: int = Field(10, ge=1)
    tensorboard: bool = False  # needs the tensorboard package (not a dependency)
    loss_curves: bool = True  # draw log.csv into loss_curves.png at the end
    # devices
    device: str = "auto"  # auto: CUDA when present, else CPU; or "cpu", "cuda", "cuda:1"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA
    channels_last: bool = False
    grad_clip: float | None = Field(None, gt=0)
    find_unused_parameters: bool = False  # DDP: for networks with branches a step skips
