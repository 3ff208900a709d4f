"""ResGANAD (thesis 8.2.2.5, 10.5): the wide residual encoder-decoder-encoder generator of
nets.presets.resganad_config, trained against a discriminator on Perlin-perturbed inputs.

Training input X*, M, N, beta = P_q(X) (eq. 8.11, q = 0.75, synth.perlin). Generator loss:
    w1 L_adv + w2 L_con + w3 L_enc + L_nse
- L_con = w_a Huber(X, X_hat) + w_b (1 - SSIM(X, X_hat)) (8.12), against the clean X, so
  the generator learns to remove the perturbation;
- L_nse = w4 L2(|(1 - beta) M X_hat - M X*|, beta N) (8.10). Our reading: the hatted M of
  8.10 is the mask P_q returned with X* (ResGANAD has no network that predicts a mask), and
  N is the noise already isolated by M. Under M, X* = (1 - beta) X + beta N, so the first
  argument equals |(1 - beta) M (X_hat - X) - beta N|: the loss is 0 exactly when X_hat
  reproduces the clean X under the mask, and it is 0 outside M and for unperturbed images.
  The L2 is the mean squared difference over all pixels;
- L_adv: feature matching on the discriminator's features of X and X_hat; L_enc: L2 between
  the first encoder's code of X* and the second encoder's code of X_hat (as GANomaly);
weights w_a = 2, w_b = 1, w1 = 1, w2 = 50, w3 = 1, w4 = 3 (8.13); Huber's delta is 1.

Inference uses the autoencoder only: score phi = 1 - SSIM(X, X_hat) (8.14); heatmap
1 - SSIM per pixel, or |X - X_hat| (8.15), min-max normalised per image (8.16) only on request
(see ResganadConfig.heatmap).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from anomalyqc.models.base import DetectorConfig, register
from anomalyqc.models.reconstruction import (
    ReconstructionConfig,
    ReconstructionDetector,
    adversarial_loss,
    discriminator_step,
    smooth_map,
    ssim_map,
    ssim_per_image,
)
from anomalyqc.nets import Discriminator, EncoderDecoderEncoder
from anomalyqc.synth.perlin import PerlinSynthesizer
from anomalyqc.training.interface import StepContext
from anomalyqc.types import Batch, Prediction


class ResganadConfig(ReconstructionConfig):
    # "small": 64x64-class inputs on a CPU budget of minutes (benchmarks/README.md, "Reconstruction
    # against embedding on vial patches"): a narrow net of 3 stages of 2 two-conv blocks (the
    # thesis's dense 64 bottleneck kept), and the same higher learning rate as GANomaly's
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "small": {"width": 4, "stages": 3, "blocks": 2, "convs": 2, "lr": 2e-3},
    }
    # network: the defaults are nets.presets.resganad_config(), the thesis's 10.5.2 at
    # width 64 and 256x256; width and image_size make it small
    width: int = Field(64, ge=1)
    blocks: int = Field(3, ge=1)
    convs: int = Field(3, ge=1)
    widen: Literal["first", "last"] = "last"
    bottleneck: Literal["conv", "dense"] = "dense"
    latent_dim: int = Field(64, ge=1)
    lr: float = Field(1.5e-4, gt=0)  # 10.5.3
    beta1: float = Field(0.9, ge=0, lt=1)  # Adam's default (10.5.3 names no other)
    # losses (8.13)
    w_a: float = Field(2.0, ge=0)  # Huber in L_con
    w_b: float = Field(1.0, ge=0)  # 1 - SSIM in L_con
    w_adv: float = Field(1.0, ge=0)  # w1
    w_con: float = Field(50.0, ge=0)  # w2
    w_enc: float = Field(1.0, ge=0)  # w3
    w_nse: float = Field(3.0, ge=0)  # w4
    huber_delta: float = Field(1.0, gt=0)
    # anomaly synthesis P_q (synth.perlin.PerlinConfig)
    perturb_probability: float = Field(0.75, ge=0, le=1)  # q
    perlin_source: Literal["uniform", "texture"] = "uniform"
    # The map: "ssim" is 1 - SSIM(X, X_hat) per pixel, the local form of the score (8.14);
    # "difference" is |X - X_hat| (8.15); both Gaussian-smoothed by smoothing_sigma.
    # normalise_map min-max scales each map to [0, 1] (8.16), as the thesis displays them:
    # then every image's map reaches 1, so a pixel threshold or a pixel AUROC across images
    # means nothing, which is why it is off by default.
    heatmap: Literal["ssim", "difference"] = "ssim"
    normalise_map: bool = False


def contextual_loss(x: torch.Tensor, x_hat: torch.Tensor, w_a: float = 2.0, w_b: float = 1.0,
                    delta: float = 1.0) -> torch.Tensor:
    """L_con (eq. 8.12): w_a Huber(X, X_hat) + w_b (1 - SSIM(X, X_hat)), batch mean."""
    huber = F.huber_loss(x_hat, x, delta=delta)
    return w_a * huber + w_b * (1 - ssim_per_image(x, x_hat)).mean()


def noise_loss(x_hat: torch.Tensor, perturbed: torch.Tensor, mask: torch.Tensor,
               noise: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """L_nse / w4 (eq. 8.10): L2(|(1 - beta) M X_hat - M X*|, beta N), see the module
    docstring. x_hat, perturbed (X*), noise (N, isolated by M): (B, C, H, W); mask (B, 1,
    H, W); beta (B,)."""
    b = beta.view(-1, 1, 1, 1).to(x_hat)
    return F.mse_loss(((1 - b) * mask * x_hat - mask * perturbed).abs(), b * noise)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] (eq. 8.16, a = 0, b = 1); a flat map becomes 0."""
    flat = maps.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    span = (hi - lo).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (maps - lo.view(-1, 1, 1, 1)) / span


@register
class Resganad(ReconstructionDetector):
    name: ClassVar[str] = "resganad"
    config_cls: ClassVar[type[DetectorConfig]] = ResganadConfig
    config: ResganadConfig
    uses_roi: ClassVar[bool] = True  # P_q stays inside the ROI when the data has one (8.2.4)

    def __init__(self, config: DetectorConfig | dict[str, Any] | None = None, **params: Any) -> None:
        super().__init__(config, **params)
        self.synth = PerlinSynthesizer(probability=self.config.perturb_probability,
                                       source=self.config.perlin_source)

    def build_networks(self) -> dict[str, nn.Module]:
        net = self.net_config()
        return {"generator": EncoderDecoderEncoder(net), "discriminator": Discriminator(net)}

    def _losses(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor,
                z_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        con = contextual_loss(x, x_hat, c.w_a, c.w_b, c.huber_delta)
        enc = F.mse_loss(z_hat, z)
        return {"con": con, "enc": enc}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        c = self.config
        g = ctx.nets["generator"]
        x = batch.image
        p = self.synth(x, roi=batch.roi, generator=ctx.generator)
        with ctx.autocast():  # forwards only: the losses (SSIM above all) stay in fp32
            x_hat, z, z_hat = g(p.images)
        terms = self._losses(x, x_hat.float(), z.float(), z_hat.float())
        terms["adv"] = adversarial_loss(ctx, x, x_hat)
        x_hat = x_hat.float()
        terms["nse"] = noise_loss(x_hat, p.images, p.mask, p.noise, p.beta)
        loss = (c.w_adv * terms["adv"] + c.w_con * terms["con"] + c.w_enc * terms["enc"]
                + c.w_nse * terms["nse"])
        ctx.step("generator", loss)
        d_loss = discriminator_step(ctx, x, x_hat)
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()},
                "d_loss": float(d_loss.detach())}

    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        """Reconstruction of clean held-out images: w2 L_con + w3 L_enc as "loss" (no
        perturbation, so the validation loss does not move with the random blobs)."""
        c = self.config
        x_hat, z, z_hat = ctx.nets["generator"](batch.image)
        terms = self._losses(batch.image, x_hat, z, z_hat)
        return {"loss": float(c.w_con * terms["con"] + c.w_enc * terms["enc"]),
                **{k: float(v) for k, v in terms.items()}}

    def infer(self, x: torch.Tensor) -> Prediction:
        x_hat = self.nets["generator"].autoencoder(x)  # type: ignore[operator]
        c = self.config
        local = 1 - ssim_map(x, x_hat)
        score = local.flatten(1).mean(dim=1)  # = 1 - ssim_per_image(x, x_hat)
        raw = local if c.heatmap == "ssim" else (x - x_hat).abs()
        maps = smooth_map(raw.mean(dim=1, keepdim=True), c.smoothing_sigma)
        return Prediction(score=score, anomaly_map=minmax(maps) if c.normalise_map else maps,
                          reconstruction=x_hat)


__all__ = ["Resganad", "ResganadConfig", "contextual_loss", "minmax", "noise_loss"]
