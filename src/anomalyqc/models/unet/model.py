"""Supervised U-Net segmentation (issue 10; thesis chapter 7): when a client's defect library
has pixel masks, a U-Net learns to segment the defects directly.

Training data: every labelled training image with its mask (workflow.training_listing:
MVTec layout ROOT/train/good + ROOT/train/<class>/ with masks in
ROOT/ground_truth/<class>/<stem>_mask.png); a good image's mask is empty. A defect image
without a mask is refused before training, naming where the masks go.

Network: nets.unet.UNet reading the image alone (inputs=1), one logit per pixel.
Loss: "dice_bce" (default), w_bce x BCE + w_dice x soft Dice over the batch's pixels (Dice
for the rare defect pixels, BCE for a calibrated probability everywhere), or "focal" (eq.
8.7, models.reconstruction.focal_loss). The validation loss is the same on held-out images.

Inference: anomaly map = sigmoid of the logits (the probability of "defect" per pixel);
image score = the maximum of the map, after a mean filter of side `score_window` when set
(a smoothed max is less moved by one hot pixel).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from anomalyqc.errors import DataError
from anomalyqc.models.base import DetectorConfig, register
from anomalyqc.models.draem.model import score_window, smoothed_max
from anomalyqc.models.reconstruction import focal_loss
from anomalyqc.models.trained import TrainedConfig, TrainedDetector
from anomalyqc.nets import UNet
from anomalyqc.progress import Progress
from anomalyqc.training.interface import StepContext
from anomalyqc.types import GOOD, Batch, Prediction, Sample

MASKS_HELP = ("put a mask per defect image in ROOT/ground_truth/<class>/<stem>_mask.png "
              "(MVTec layout: images in ROOT/train/<class>/), white on the defect")


class UnetConfig(TrainedConfig):
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "small": {"unet_width": 8, "unet_depth": 3, "lr": 2e-3},
    }
    unet_width: int = Field(16, ge=1)
    unet_depth: int = Field(4, ge=1, le=8)  # 2x downsamplings; the input must divide 2**depth
    unet_max_width: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    loss: Literal["dice_bce", "focal"] = "dice_bce"
    w_bce: float = Field(1.0, ge=0)
    w_dice: float = Field(1.0, ge=0)
    dice_smooth: float = Field(1.0, gt=0)  # added to both sides of the Dice ratio
    focal_gamma: float = Field(2.0, ge=0)
    focal_alpha: float | None = Field(None, gt=0, lt=1)
    prior_probability: float = Field(0.01, gt=0, lt=1)  # the output's starting probability
    # inference: side of the mean filter before the max; None: the raw max
    score_window: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _size_fits_the_unet(self) -> UnetConfig:
        self.require_halvings(self.unet_depth, "unet_depth", "a lower unet_depth")
        if self.loss == "dice_bce" and self.w_bce == 0 and self.w_dice == 0:
            raise ValueError("w_bce and w_dice are both 0: nothing to train on")
        return self


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s) over the whole batch: per image the
    ratio is undefined for a good image's empty mask, over the batch it is not."""
    t = target.to(prob)
    inter = (prob * t).sum()
    return 1 - (2 * inter + smooth) / (prob.sum() + t.sum() + smooth)


@register
class Unet(TrainedDetector):
    name: ClassVar[str] = "unet"
    config_cls: ClassVar[type[DetectorConfig]] = UnetConfig
    config: UnetConfig
    supervised: ClassVar[bool] = True

    def build_networks(self) -> dict[str, nn.Module]:
        c = self.config
        net = UNet(channels=c.channels, inputs=1, base_width=c.unet_width, depth=c.unet_depth,
                   max_width=c.unet_max_width)
        # Start from "defect is rare" (Lin et al.'s prior init, p = prior_probability): at
        # zero bias every pixel starts at p = 0.5, and the first hundreds of steps only
        # learn that nearly every pixel is good.
        assert net.out.bias is not None  # nn.Conv2d's default bias=True
        nn.init.constant_(net.out.bias, -math.log((1 - c.prior_probability) / c.prior_probability))
        return {"unet": net}

    def fit_dataset(self, dataset: Dataset[Sample] | Sequence[Sample],
                    progress: Progress | None = None, work_dir: str | Path = "training",
                    resume: bool = False) -> TrainedDetector:
        check_masks(dataset)
        return super().fit_dataset(dataset, progress, work_dir, resume)

    def losses(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        c = self.config
        with ctx.autocast():
            logits = ctx.nets["unet"](batch.image)
        logits = logits.float()
        if batch.mask is not None:
            target = batch.mask.to(logits)
        elif bool((batch.label == GOOD).all()):  # a batch of good images only: no masks read
            target = torch.zeros_like(logits)
        else:  # check_masks refuses such data before training
            raise DataError(f"unet: a training batch has defect images without masks; {MASKS_HELP}")
        if c.loss == "focal":
            focal = focal_loss(torch.sigmoid(logits), target, c.focal_gamma, c.focal_alpha)
            return {"loss": focal, "focal": focal}
        bce = F.binary_cross_entropy_with_logits(logits, target)
        dice = soft_dice_loss(torch.sigmoid(logits), target, c.dice_smooth)
        return {"loss": c.w_bce * bce + c.w_dice * dice, "bce": bce, "dice": dice}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        terms = self.losses(batch, ctx)
        ctx.step("unet", terms["loss"])
        return {k: float(v.detach()) for k, v in terms.items()}

    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        return {k: float(v) for k, v in self.losses(batch, ctx).items()}

    def infer(self, x: torch.Tensor) -> Prediction:
        prob = torch.sigmoid(self.nets["unet"](x).float())
        w = self.config.score_window
        score = prob.flatten(1).amax(dim=1) if w is None else \
            smoothed_max(prob, score_window(tuple(x.shape[-2:]), w))  # type: ignore[arg-type]
        return Prediction(score=score, anomaly_map=prob)


def check_masks(dataset: Dataset[Sample] | Sequence[Sample]) -> None:
    """Refuse training data where a defect image has no mask (or where no image is a
    defect with a mask), naming the first such image and where masks go. Reads the
    records of an ImageDataset, not its images."""
    records = getattr(dataset, "records", None)
    if records is not None:
        items = [(r.label, r.mask_path is not None, str(r.path)) for r in records]
    else:
        items = [(s.label, s.mask is not None, s.path)
                 for s in (dataset[i] for i in range(len(dataset)))]  # type: ignore[arg-type]
    missing = [p for label, has, p in items if label != GOOD and not has]
    if missing:
        raise DataError(f"unet learns from pixel masks, and {len(missing)} defect image(s) have "
                        f"none (first: {missing[0] or 'an in-memory image'}); {MASKS_HELP}")
    if not any(label != GOOD for label, _, _ in items):
        raise DataError(f"unet learns from pixel masks and the training data has no defect "
                        f"images with masks; {MASKS_HELP}")


__all__ = ["Unet", "UnetConfig", "check_masks", "soft_dice_loss"]
