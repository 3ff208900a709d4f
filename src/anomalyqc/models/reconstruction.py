"""What the reconstruction detectors (GANomaly, DRAEM, GRD-Net, ResGANAD) share: the
generator's shape parameters and the losses and maps built from X and its reconstruction X_hat.
Training, inference and weights come from models.trained.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import kornia
import numpy as np
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
    if exported_small(x):
        return _ssim_by_matrices(x, y, window)
    return kornia.metrics.ssim(x, y, window, max_val=1.0)


# In an exported graph, images up to this side filter their Gaussians as two matrix products
# with the reflected borders folded into the matrices (reflect_filter_matrix): ONNX Runtime's
# grouped convolutions are slower there, and above it the dense matrices waste more than they
# save (benchmarks/README.md, "ONNX export").
MATRIX_FILTER_MAX_SIDE = 96


def exported_small(x: torch.Tensor) -> bool:
    """Whether x's Gaussian filters go to an ONNX graph as matrix products."""
    return torch.onnx.is_in_onnx_export() and max(x.shape[-2:]) <= MATRIX_FILTER_MAX_SIDE


def gaussian_taps(size: int, sigma: float) -> np.ndarray:
    """The normalised (size,) Gaussian of kornia's get_gaussian_kernel1d, in float64."""
    x = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return np.asarray(g / g.sum())


def reflect_filter_matrix(n: int, k: np.ndarray) -> torch.Tensor:
    """(n, n) M with (v @ M)[i] = sum_j k[j] v[reflect(i + j - r)]: the 1-D correlation
    with reflected borders (as kornia's, which needs r < n) as a matrix, summed in float64
    and rounded once. Built with numpy, so an exporter records it as a constant."""
    r = len(k) // 2
    src = np.abs(np.arange(n)[None, :] + np.arange(-r, r + 1)[:, None])  # (k, n): tap, output
    src = np.where(src > n - 1, 2 * (n - 1) - src, src)
    m = np.zeros((n, n))
    np.add.at(m, (src.ravel(), np.tile(np.arange(n), len(k))), np.repeat(k, n))
    return torch.tensor(m, dtype=torch.float32)


def filter_by_matrices(x: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """The separable filter `kernel` (k,) over the last two dims of x, reflected borders."""
    h, w = x.shape[-2:]
    rows = reflect_filter_matrix(w, kernel).to(x)
    cols = reflect_filter_matrix(h, kernel).t().contiguous().to(x)
    return cols @ (x @ rows)


def _ssim_by_matrices(x: torch.Tensor, y: torch.Tensor, window: int) -> torch.Tensor:
    """kornia.metrics.ssim's arithmetic, the five moments filtered in one stacked pass."""
    kernel = gaussian_taps(window, 1.5)
    c = x.shape[1]
    mu1, mu2, xx, yy, xy = filter_by_matrices(torch.cat([x, y, x * x, y * y, x * y], 1),
                                              kernel).split(c, 1)
    c1, c2 = 0.01**2, 0.03**2
    mu12, mu1_sq, mu2_sq = mu1 * mu2, mu1**2, mu2**2
    num = (2.0 * mu12 + c1) * (2.0 * (xy - mu12) + c2)
    den = (mu1_sq + mu2_sq + c1) * ((xx - mu1_sq) + (yy - mu2_sq) + c2)
    return num / (den + 1e-12)


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
    if exported_small(maps):
        return filter_by_matrices(maps, gaussian_taps(k, sigma))
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
