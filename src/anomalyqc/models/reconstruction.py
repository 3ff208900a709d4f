"""What the reconstruction detectors (GANomaly, DRAEM, GRD-Net, ResGANAD) share: the
generator's shape parameters and the losses and maps built from X and its reconstruction X_hat.
Training, inference and weights come from models.trained.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import kornia
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from anomalyqc.errors import ConfigError
from anomalyqc.models.base import DetectorConfig
from anomalyqc.models.trained import TrainedConfig, TrainedDetector
from anomalyqc.nets.coders import NetConfig, as_config
from anomalyqc.training.interface import StepContext


class ReconstructionConfig(TrainedConfig):
    """The generator's shape (see anomalyqc.nets.coders.NetConfig) and the difference map's
    smoothing, on top of the training parameters."""

    width: int = Field(32, ge=1)  # stem filters; stage i outputs width * 2**(i+1)
    width_mult: float = Field(2.0, gt=0)
    max_width: int | None = Field(None, ge=1)
    stages: int = Field(4, ge=1, le=8)
    stem: Literal["conv", "strided"] = "conv"  # "strided": a 4x4 stride-2 stem (NetConfig)
    blocks: int = Field(2, ge=1)
    convs: int = Field(2, ge=1)
    residual: bool = True
    widen: Literal["first", "last"] = "first"
    bottleneck: Literal["conv", "dense"] = "conv"
    latent_channels: int = Field(32, ge=1)
    latent_dim: int = Field(100, ge=1)
    smoothing_sigma: float = Field(4.0, ge=0)  # Gaussian blur of |X - X_hat| maps, 0 = none

    @model_validator(mode="after")
    def _size_fits_the_stages(self) -> ReconstructionConfig:
        self.require_halvings(self.stages + (self.stem == "strided"), "stages", "fewer stages")
        return self


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 11) -> torch.Tensor:
    """SSIM per pixel and channel (B, C, H, W) of images in [0, 1] (kornia, Gaussian window).
    kornia.losses.ssim_loss returns (1 - SSIM) / 2, not the thesis's 1 - SSIM."""
    side = min(x.shape[-2:])
    if side < window:  # tiny images: the largest odd window that fits
        window = max(1, (side - 1) // 2 * 2 + 1)
    return kornia.metrics.ssim(x, y, window, max_val=1.0)


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of each image (B,)."""
    return ssim_map(x, y).flatten(1).mean(dim=1)


def feature_matching(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """GANomaly's adversarial loss for the generator: L2 between the discriminator's features
    of the real and reconstructed images (the real side is a fixed target)."""
    return F.mse_loss(fake, real.detach())


def adversarial_loss(ctx: StepContext, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """L_adv (eq. 8.1) for the generator's step, as GANomaly's own code computes it: D on the
    real images and on the reconstructions in two forwards. The real side is a fixed target,
    so it runs without a graph, and D's weights are frozen while the reconstructions pass
    through it, so the backward computes only what reaches the generator (D's update is
    discriminator_step). D's gradients here would be discarded anyway, so they are not
    computed."""
    d = ctx.unwrapped("discriminator")
    with torch.no_grad(), ctx.autocast():
        _, f_real = d(x)
    d.requires_grad_(False)
    try:
        with ctx.autocast():
            _, f_fake = d(x_hat)
    finally:
        d.requires_grad_(True)
    return feature_matching(f_real.float(), f_fake.float())


def discriminator_loss(logits: torch.Tensor, n_real: int) -> torch.Tensor:
    """BCE with the first n_real logits labelled real (1) and the rest fake (0)."""
    target = torch.zeros_like(logits)
    target[:n_real] = 1.0
    return F.binary_cross_entropy_with_logits(logits, target)


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: float | None = None, weight: torch.Tensor | None = None,
               eps: float = 1e-6) -> torch.Tensor:
    """Binary focal loss FL(p_t) = -(1 - p_t)^gamma log p_t (thesis eq. 8.7), mean over the
    pixels where `weight` is nonzero (all pixels when weight is None).

    `prob` is the predicted probability of "anomalous" per pixel (after the sigmoid, so a
    caller can multiply it by an ROI first, as GRD-Net's I = A x ROI does); `target` the
    0/1 mask M. p_t is prob where M = 1 and 1 - prob where M = 0, so the easy, well
    classified pixels (p_t near 1) weigh little and the rare anomalous ones dominate.
    alpha (optional) weighs the anomalous class by alpha and the normal one by 1 - alpha.
    """
    p = prob.clamp(eps, 1 - eps)
    t = target.to(p)
    p_t = t * p + (1 - t) * (1 - p)
    loss = -((1 - p_t) ** gamma) * torch.log(p_t)
    if alpha is not None:
        loss = loss * (t * alpha + (1 - t) * (1 - alpha))
    if weight is None:
        return loss.mean()
    w = weight.to(p).expand_as(loss)
    return (loss * w).sum() / w.sum().clamp_min(1.0)


def smooth_map(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, 1, H, W) maps (reflected borders); sigma <= 0 leaves them."""
    if sigma <= 0:
        return maps
    k = min(2 * int(4 * sigma + 0.5) + 1, (min(maps.shape[-2:]) - 1) // 2 * 2 + 1)
    return kornia.filters.gaussian_blur2d(maps, (k, k), (sigma, sigma), border_type="reflect")


def discriminator_step(ctx: StepContext, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """The GAN discriminator's update: real X against the detached X_hat, one forward of D
    (as DistributedDataParallel wants), BCE; returns the loss."""
    with ctx.autocast():
        logits, _ = ctx.nets["discriminator"](torch.cat([x, x_hat.detach()]))
    d_loss = discriminator_loss(logits.float(), len(x))
    ctx.step("discriminator", d_loss)
    return d_loss


def difference_map(x: torch.Tensor, x_hat: torch.Tensor, sigma: float) -> torch.Tensor:
    """|X - X_hat| averaged over channels (B, 1, H, W), Gaussian-smoothed when sigma > 0."""
    return smooth_map((x - x_hat).abs().mean(dim=1, keepdim=True), sigma)


class ReconstructionDetector(TrainedDetector):
    """Base of the reconstruction family: a generator shaped by ReconstructionConfig."""

    config_cls: ClassVar[type[DetectorConfig]] = ReconstructionConfig
    config: ReconstructionConfig

    def net_config(self) -> NetConfig:
        """The generator's shape from the detector's parameters (channels must be known)."""
        c = self.config
        if c.channels is None:
            raise ConfigError(f"{self.name}: the number of channels is unknown before fit")
        try:
            return as_config(dict(
                channels=c.channels, image_size=self.input_size, base_width=c.width,
                width_mult=c.width_mult, max_width=c.max_width, stages=c.stages, stem=c.stem, blocks=c.blocks,
                convs=c.convs, residual=c.residual, widen=c.widen, bottleneck=c.bottleneck,
                latent_channels=c.latent_channels, latent_dim=c.latent_dim))
        except ConfigError as exc:
            raise ConfigError(f"{self.name}: {exc}; set image_size/stages to fit") from None
