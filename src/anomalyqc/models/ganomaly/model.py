"""GANomaly (thesis 8.2.2.1, eqs. 8.4-8.6): an encoder-decoder-encoder generator trained
against a discriminator.

Generator loss L = w1 L_adv + w2 L_con + w3 L_enc (8.5), with
- L_adv: feature matching, L2 between the discriminator's features of X and X_hat;
- L_con = w_a L1(X, X_hat) + w_b (1 - SSIM(X, X_hat)) (8.4);
- L_enc = L2(z, z_hat), the bottleneck of X against the second encoder's code of X_hat;
weights (w_a, w_b) = (1, 1) and (w1, w2, w3) = (1, 50, 1) (8.6). The discriminator learns
real X against fake X_hat with binary cross-entropy.

Scores: `score="latent"` (GANomaly's own, the default) is the mean squared latent distance
|z - z_hat|^2; `score="reconstruction"` is the per-image contextual loss. Both are always in
Prediction.extras. The anomaly map is |X - X_hat| smoothed by a Gaussian.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from anomalyqc.models.base import DetectorConfig, register
from anomalyqc.models.reconstruction import (
    ReconstructionConfig,
    ReconstructionDetector,
    adversarial_loss,
    difference_map,
    discriminator_step,
    ssim_per_image,
)
from anomalyqc.nets import Discriminator, EncoderDecoderEncoder
from anomalyqc.training.interface import StepContext
from anomalyqc.types import Batch, Prediction


class GanomalyConfig(ReconstructionConfig):
    # "small": 64x64-class inputs on a CPU budget of minutes (benchmarks/README.md, "Reconstruction
    # against embedding on vial patches"): a narrow net that takes many steps, and a 10x
    # higher learning rate, which learns faster in the first few hundred steps
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "small": {"width": 4, "stages": 3, "latent_channels": 16, "lr": 2e-3},
    }
    w_a: float = Field(1.0, ge=0)  # L1 in L_con (8.4, 8.6)
    w_b: float = Field(1.0, ge=0)  # 1 - SSIM in L_con
    w_adv: float = Field(1.0, ge=0)  # w1
    w_con: float = Field(50.0, ge=0)  # w2
    w_enc: float = Field(1.0, ge=0)  # w3
    score: Literal["latent", "reconstruction"] = "latent"


def contextual_loss(x: torch.Tensor, x_hat: torch.Tensor, w_a: float = 1.0,
                    w_b: float = 1.0) -> torch.Tensor:
    """L_con per image (B,): w_a L1 + w_b (1 - SSIM) (eq. 8.4)."""
    l1 = (x - x_hat).abs().flatten(1).mean(dim=1)
    return w_a * l1 + w_b * (1 - ssim_per_image(x, x_hat))


def encoder_loss(z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    """L_enc per image (B,): mean squared distance of the two codes."""
    return (z - z_hat).pow(2).flatten(1).mean(dim=1)


@register
class Ganomaly(ReconstructionDetector):
    name: ClassVar[str] = "ganomaly"
    config_cls: ClassVar[type[DetectorConfig]] = GanomalyConfig
    config: GanomalyConfig

    def build_networks(self) -> dict[str, nn.Module]:
        net = self.net_config()
        return {"generator": EncoderDecoderEncoder(net), "discriminator": Discriminator(net)}

    def _generator_losses(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor,
                          z_hat: torch.Tensor, adv: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        con = contextual_loss(x, x_hat, c.w_a, c.w_b).mean()
        enc = encoder_loss(z, z_hat).mean()
        return {"loss": c.w_adv * adv + c.w_con * con + c.w_enc * enc, "adv": adv, "con": con,
                "enc": enc}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        g = ctx.nets["generator"]
        x = batch.image
        with ctx.autocast():  # forwards only: the losses (SSIM above all) stay in fp32
            x_hat, z, z_hat = g(x)
        adv = adversarial_loss(ctx, x, x_hat)
        losses = self._generator_losses(x, x_hat.float(), z.float(), z_hat.float(), adv)
        ctx.step("generator", losses["loss"])
        d_loss = discriminator_step(ctx, x, x_hat)
        return {**{k: float(v.detach()) for k, v in losses.items()},
                "d_loss": float(d_loss.detach())}

    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        """Contextual and encoder terms on held-out images ("loss" leaves out L_adv, which
        measures the discriminator as much as the generator)."""
        c = self.config
        x_hat, z, z_hat = ctx.nets["generator"](batch.image)
        con = contextual_loss(batch.image, x_hat, c.w_a, c.w_b).mean()
        enc = encoder_loss(z, z_hat).mean()
        return {"loss": float(c.w_con * con + c.w_enc * enc), "con": float(con),
                "enc": float(enc)}

    def infer(self, x: torch.Tensor) -> Prediction:
        c = self.config
        x_hat, z, z_hat = self.nets["generator"](x)
        latent = encoder_loss(z, z_hat)
        recon = contextual_loss(x, x_hat, c.w_a, c.w_b)
        return Prediction(score=latent if c.score == "latent" else recon,
                          anomaly_map=difference_map(x, x_hat, c.smoothing_sigma),
                          reconstruction=x_hat,
                          extras={"latent_score": latent, "reconstruction_score": recon})


__all__ = ["Ganomaly", "GanomalyConfig", "contextual_loss", "encoder_loss"]
