"""DRAEM (thesis 8.2.2.3; Zavrtanik et al., ICCV 2021): a reconstructive autoencoder and a
discriminative U-Net trained jointly on Perlin-perturbed images.

Training input X*, M = P_q(X) (eq. 8.11, synth.perlin; uniform noise by default, the
thesis's DRAEM variant; the blobs stay inside the ROI when the batch has one). The
autoencoder maps X* to X_hat and learns to restore the clean X; the U-Net reads
concat(X*, X_hat) and learns to segment M. One loss trains both through one Adam:

    L = w_l2 L2(X_hat, X) + w_ssim (1 - SSIM(X_hat, X)) + w_focal FL(sigmoid(U), M)

with the focal loss of eq. 8.7 (gamma 2, models.reconstruction.focal_loss). The U-Net's
gradient reaches the autoencoder too, as in DRAEM's code (no detach between them).

Inference: the anomaly map is the U-Net's probability of "anomalous" per pixel; the image
score is the maximum of that map smoothed by a mean filter (DRAEM's 21x21 window at 256 px,
scaled with the input unless `score_window` is set). The reconstruction is returned too.

Our U-Net has one sigmoid output where DRAEM's has a two-class softmax: for two classes the
softmax is the sigmoid of the logit difference, so the two are the same model.
"""

from __future__ import annotations

import zlib
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from anomalyqc.models.base import DetectorConfig, register
from anomalyqc.models.reconstruction import (
    ReconstructionConfig,
    ReconstructionDetector,
    focal_loss,
    ssim_per_image,
)
from anomalyqc.nets import Autoencoder, UNet
from anomalyqc.synth.perlin import PerlinSynthesizer
from anomalyqc.training.interface import OptimGroup, StepContext
from anomalyqc.training.sampling import VALIDATE, derived_seed
from anomalyqc.types import Batch, Prediction

# DRAEM's score window and the input side it was chosen for.
_DRAEM_WINDOW, _DRAEM_SIDE = 21, 256


class DraemConfig(ReconstructionConfig):
    # "small": 64x64-class inputs on a CPU budget of minutes: narrower networks and a higher
    # learning rate, as the other detectors' small presets
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "small": {"width": 8, "stages": 3, "lr": 1e-3, "unet_width": 8, "unet_depth": 3},
    }
    # reconstructive autoencoder: ReconstructionConfig's width, stages, blocks, convs,
    # bottleneck ("conv" by default: latent_channels maps at 1/2**stages of the input)
    width: int = Field(16, ge=1)  # DRAEM's own is 128; 16 trains on a CPU at small sizes
    # discriminative U-Net (nets.unet.UNetConfig)
    unet_width: int = Field(16, ge=1)  # DRAEM: 64
    unet_depth: int = Field(4, ge=1, le=8)  # 2x downsamplings; DRAEM: 5
    unet_max_width: int = Field(256, ge=1)  # DRAEM: 512
    # optimisation: one Adam over both networks (DRAEM: lr 1e-4, Adam's default betas) and
    # a cosine decay over the run, the trainer's nearest to DRAEM's late step decays
    lr: float = Field(1e-4, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "plateau", "cosine"] = "cosine"
    # losses
    w_l2: float = Field(1.0, ge=0)
    w_ssim: float = Field(1.0, ge=0)
    w_focal: float = Field(1.0, ge=0)
    focal_gamma: float = Field(2.0, ge=0)  # eq. 8.7
    focal_alpha: float | None = Field(None, gt=0, lt=1)  # DRAEM weighs both classes alike
    # anomaly synthesis P_q (synth.perlin.PerlinConfig)
    perturb_probability: float = Field(0.75, ge=0, le=1)  # q (DRAEM's own: 0.5)
    perlin_source: Literal["uniform", "texture"] = "uniform"
    # inference: side of the mean filter before the max; None: 21 px per 256 px of input
    score_window: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _size_fits_the_unet(self) -> DraemConfig:
        self.require_halvings(self.unet_depth, "unet_depth", "a lower unet_depth")
        return self


def score_window(size: tuple[int, int], window: int | None = None) -> tuple[int, int]:
    """The mean filter's (height, width): `window` when given, else DRAEM's 21 px at 256 px
    scaled to the input; always odd (centred) and at least 1."""
    def odd(side: int) -> int:
        return side if side % 2 else side + 1

    if window is not None:
        return odd(window), odd(window)
    h, w = (max(1, round(_DRAEM_WINDOW * s / _DRAEM_SIDE)) for s in size)
    return odd(h), odd(w)


def smoothed_max(mask: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Image score (B,): the max of each (B, 1, H, W) map after a mean filter.

    The mean is over the window's pixels inside the image (count_include_pad=False), where
    DRAEM counts the zero padding too: at small inputs the window is a large share of the
    image, and counting zeros would mute a defect at the border."""
    kh, kw = window
    smooth = F.avg_pool2d(mask, (kh, kw), stride=1, padding=(kh // 2, kw // 2),
                          count_include_pad=False)
    return smooth.flatten(1).amax(dim=1)


def _content_generator(x: torch.Tensor, seed: int) -> torch.Generator:
    """A generator seeded by the batch's pixels: the same validation images get the same
    blobs every epoch, so their losses compare epochs rather than draws."""
    crc = zlib.crc32(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return torch.Generator(device=x.device).manual_seed(derived_seed(seed, VALIDATE, crc))


@register
class Draem(ReconstructionDetector):
    name: ClassVar[str] = "draem"
    config_cls: ClassVar[type[DetectorConfig]] = DraemConfig
    config: DraemConfig
    uses_roi: ClassVar[bool] = True  # Perlin blobs stay inside the ROI when the data has one

    def __init__(self, config: DetectorConfig | dict[str, Any] | None = None, **params: Any) -> None:
        super().__init__(config, **params)
        self.synth = PerlinSynthesizer(probability=self.config.perturb_probability,
                                       source=self.config.perlin_source)

    def build_networks(self) -> dict[str, nn.Module]:
        c = self.config
        return {"reconstructive": Autoencoder(self.net_config()),
                "discriminative": UNet(channels=c.channels, base_width=c.unet_width,
                                       depth=c.unet_depth, max_width=c.unet_max_width)}

    def optimizer_groups(self) -> dict[str, OptimGroup]:
        return {"draem": OptimGroup(("reconstructive", "discriminative"), self.config.lr,
                                    (self.config.beta1, 0.999))}

    def losses(self, batch: Batch, ctx: StepContext, generator: torch.Generator,
               ) -> dict[str, torch.Tensor]:
        """Perturb the batch, reconstruct, segment: the terms of L and their weighted sum."""
        c = self.config
        x = batch.image
        p = self.synth(x, roi=batch.roi, generator=generator)
        with ctx.autocast():  # forwards only
            x_hat = ctx.nets["reconstructive"](p.images)
            logits = ctx.nets["discriminative"](p.images, x_hat)
        x_hat, logits = x_hat.float(), logits.float()  # the losses (SSIM above all) in fp32
        l2 = F.mse_loss(x_hat, x)
        ssim = (1 - ssim_per_image(x_hat, x)).mean()
        focal = focal_loss(torch.sigmoid(logits), p.mask, c.focal_gamma, c.focal_alpha)
        loss = c.w_l2 * l2 + c.w_ssim * ssim + c.w_focal * focal
        return {"loss": loss, "l2": l2, "ssim": ssim, "focal": focal}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        terms = self.losses(batch, ctx, ctx.generator)
        ctx.step("draem", terms["loss"])
        return {k: float(v.detach()) for k, v in terms.items()}

    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        """The training loss on held-out images, perturbed by blobs fixed per image set (see
        _content_generator): restoring X and segmenting M on images never trained on."""
        gen = _content_generator(batch.image, self.config.seed)
        terms = self.losses(batch, ctx, gen)
        return {k: float(v) for k, v in terms.items()}

    def infer(self, x: torch.Tensor) -> Prediction:
        x_hat = self.nets["reconstructive"](x)
        mask = torch.sigmoid(self.nets["discriminative"](x, x_hat))
        window = score_window(tuple(x.shape[-2:]), self.config.score_window)  # type: ignore[arg-type]
        return Prediction(score=smoothed_max(mask, window), anomaly_map=mask,
                          reconstruction=x_hat)


__all__ = ["Draem", "DraemConfig", "score_window", "smoothed_max"]
