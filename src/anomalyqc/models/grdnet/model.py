"""GRD-Net (thesis 8.2.2.4, figs. 8.4-8.6; 9.1.3): a residual GANomaly generator as the
reconstructive network, a U-Net as the discriminative one, and a region of interest (ROI)
that tells the U-Net where defects matter.

Training (fig. 8.5): X* , M = P_q(X) (synth.perlin, restricted to the ROI when there is one);
the generator G (encoder-decoder-encoder, residual, nets.presets.grdnet_config: CRAE 32x8x8)
reconstructs X_hat from X*; the U-Net reads concat(X*, X_hat) and outputs A = sigmoid(logits).

    L_tot = L_gan + w_focal L_roi                                   (8.9)
    L_gan = w1 L_adv + w2 L_con(X, X_hat) + w3 L_enc(z, z_hat)      (8.5, as GANomaly's, with
            L_con = w_a L1 + w_b (1 - SSIM) against the clean X, so G learns to remove the blobs)

L_roi is one of the four cases of 9.1.3.2 (`roi_loss`), FL the focal loss (8.7, gamma = 2)
and I = A x ROI the intersection mask (8.8):

    case1 / fl_overlap            FL(A, M) + L_overlap(A, ROI)        (9.4)
    case2 / intersection          FL(I, M)                            (8.9, the default)
    case3 / intersection_overlap  FL(I, M) + L_overlap(A, ROI)
    case4 / negated_overlap       FL(A, M) + L_outside(A, ROI)

L_overlap = w (1 - |A n ROI| / min(|A|, |ROI|)) (9.3). Our reading of the cardinalities for a
soft A in [0, 1]: |A| = sum of A, |ROI| = sum of ROI, |A n ROI| = sum of A x ROI (all per
image; then the batch mean), which is the set formula when A is binary and is
differentiable; since sum(A x ROI) <= min(sum A, sum ROI) the term lies in [0, w]. Case 4's
"negated overlap" is the same ratio taken against the outside, 1 - ROI, and minimised:
w |A n (1 - ROI)| / min(|A|, |1 - ROI|), 0 when A stays inside the ROI. Case 3 is read as
case 2 plus the overlap term (read as FL(A, M) + L_overlap it would be case 1 again). L_gan
and L_roi train G and the U-Net together (one optimizer, as DRAEM trains its two networks);
the discriminator D learns real X against fake X_hat.

Inference (fig. 8.6): A = U-Net(X, G(X)); heatmap = A x ROI; score = the largest mean of A
over a score_window x score_window window centred on an ROI pixel, averaging over ROI pixels
only (smooth(A x ROI) / smooth(ROI)): DRAEM's "max of the smoothed mask" (a lone hot pixel
does not decide, a coherent blob does), restricted to the ROI without diluting a blob at the
ROI's border with the zeros outside it. An image whose ROI is empty has nothing to inspect:
score 0.

roi_mode: "auto" (the default) becomes "roi" at fit when the training images have ROIs and
"whole_image" when they have none (ROI = the whole image, as the thesis has it without
one); "roi" insists on ROIs; "whole_image" ignores them, in training and at inference. A
model trained with ROIs refuses images without one: its U-Net was taught nothing outside
the ROI (under case 2 its output there is arbitrary), so its whole-image map means nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.utils.data import Dataset

from anomalyqc.data.transforms import as_hw
from anomalyqc.errors import ConfigError
from anomalyqc.models.base import DetectorConfig, register
from anomalyqc.models.ganomaly.model import contextual_loss, encoder_loss
from anomalyqc.models.reconstruction import (
    ReconstructionConfig,
    ReconstructionDetector,
    adversarial_loss,
    discriminator_step,
    focal_loss,
)
from anomalyqc.nets import Discriminator, EncoderDecoderEncoder, UNet
from anomalyqc.progress import Progress
from anomalyqc.synth.perlin import PerlinSynthesizer
from anomalyqc.training.interface import OptimGroup, StepContext
from anomalyqc.types import Batch, Prediction, Sample

RoiLoss = Literal["case1", "case2", "case3", "case4"]
ROI_LOSS_NAMES: dict[str, str] = {"fl_overlap": "case1", "intersection": "case2",
                                  "intersection_overlap": "case3", "negated_overlap": "case4"}
_EPS = 1e-6


class GrdnetConfig(ReconstructionConfig):
    # "small": 64x64-class inputs on a CPU budget of minutes, as GANomaly's (its generator is
    # GRD-Net's reconstructive part), with a U-Net of matching width; anomalies filled with
    # texture cut from other training images: on the vial patches the U-Net trained on uniform
    # noise found the real defects far worse (benchmarks/README.md, "Reconstruction against
    # embedding on vial patches")
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "small": {"width": 4, "stages": 3, "latent_channels": 16, "lr": 2e-3,
                  "unet_width": 8, "unet_depth": 3, "perlin_source": "texture"},
    }
    # generator: nets.presets.grdnet_config (stages of two blocks of two convs down to 8x8,
    # conv bottleneck 32x8x8 = CRAE; bottleneck=dense, latent_dim=2048 = DRAE); stages
    # default to as many as bring the input to 8x8
    max_width: int | None = Field(512, ge=1)
    latent_channels: int = Field(32, ge=1)
    latent_dim: int = Field(2048, ge=1)
    # discriminative U-Net (nets.unet)
    unet_width: int = Field(32, ge=1)
    unet_depth: int = Field(4, ge=1, le=8)
    unet_max_width: int = Field(512, ge=1)
    # L_gan (8.5, 8.6), as GANomaly
    w_a: float = Field(1.0, ge=0)
    w_b: float = Field(1.0, ge=0)
    w_adv: float = Field(1.0, ge=0)
    w_con: float = Field(50.0, ge=0)
    w_enc: float = Field(1.0, ge=0)
    # L_roi (8.7-8.9, 9.1.3.2)
    w_focal: float = Field(1.0, ge=0)
    focal_gamma: float = Field(2.0, ge=0)
    focal_alpha: float | None = Field(None, ge=0, le=1)
    roi_loss: RoiLoss = "case2"
    overlap_weight: float = Field(0.5, ge=0, le=1)  # w of 9.3; the thesis gives w in [0, 1] only
    # anomaly synthesis P_q (synth.perlin)
    perturb_probability: float = Field(0.75, ge=0, le=1)
    perlin_source: Literal["uniform", "texture"] = "uniform"
    # scoring
    score_window: int = Field(21, ge=1)  # DRAEM's 21x21 mean filter; clipped to the image
    # auto: fixed at fit to roi (the training images have ROIs; predict then needs them) or
    # whole_image (they have none, or to ignore them)
    roi_mode: Literal["auto", "roi", "whole_image"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _stages_to_8x8(cls, data: Any) -> Any:
        """stages unset: as many halvings as bring the smaller side to 8 (GRD-Net's 8x8
        bottleneck), at least one."""
        if isinstance(data, dict) and data.get("stages") is None:
            size = data.get("crop_size") or data.get("image_size", 256)
            try:
                h, w = as_hw(tuple(size) if isinstance(size, list) else size)
            except (ConfigError, TypeError, ValueError):
                return data  # the field validators say what is wrong with it
            data = {**data, "stages": max(1, min(8, int(math.log2(max(min(h, w) // 8, 1)))))}
        return data

    @field_validator("roi_loss", mode="before")
    @classmethod
    def _roi_loss_name(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ROI_LOSS_NAMES.values() and v not in ROI_LOSS_NAMES:
            raise ValueError(f"unknown ROI loss {v!r}: use case1..case4 or "
                             f"{', '.join(ROI_LOSS_NAMES)}")
        return ROI_LOSS_NAMES.get(v, v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _unet_fits(self) -> GrdnetConfig:
        self.require_halvings(self.unet_depth, "unet_depth", "a lower unet_depth")
        return self


# ------------------------------------------------------------------------------ losses
def overlap_loss(a: torch.Tensor, roi: torch.Tensor, w: float) -> torch.Tensor:
    """L_overlap (eq. 9.3), soft: w (1 - sum(A ROI) / min(sum A, sum ROI)), batch mean."""
    inter = (a * roi).flatten(1).sum(1)
    denom = torch.minimum(a.flatten(1).sum(1), roi.expand_as(a).flatten(1).sum(1))
    return w * (1 - (inter + _EPS) / (denom + _EPS)).mean()


def outside_loss(a: torch.Tensor, roi: torch.Tensor, w: float) -> torch.Tensor:
    """Case 4's negated overlap: w sum(A (1 - ROI)) / min(sum A, sum (1 - ROI)), batch mean;
    0 when A stays inside the ROI."""
    out = 1 - roi.expand_as(a)
    inter = (a * out).flatten(1).sum(1)
    denom = torch.minimum(a.flatten(1).sum(1), out.flatten(1).sum(1))
    return w * (inter / (denom + _EPS)).mean()


def roi_losses(a: torch.Tensor, mask: torch.Tensor, roi: torch.Tensor, case: str,
               gamma: float = 2.0, alpha: float | None = None, w: float = 0.5,
               ) -> dict[str, torch.Tensor]:
    """The discriminative loss of `case` (see the module docstring) as its focal and
    overlap parts (overlap 0 for case 2): A, M, ROI are (B, 1, H, W), A in [0, 1]."""
    case = ROI_LOSS_NAMES.get(case, case)
    if case not in ("case1", "case2", "case3", "case4"):
        raise ConfigError(f"unknown ROI loss {case!r}: use case1..case4 or "
                          f"{', '.join(ROI_LOSS_NAMES)}")
    inside = case in ("case2", "case3")
    focal = focal_loss(a * roi if inside else a, mask, gamma, alpha)
    if case == "case2":
        overlap = torch.zeros((), device=a.device)
    elif case == "case4":
        overlap = outside_loss(a, roi, w)
    else:
        overlap = overlap_loss(a, roi, w)
    return {"focal": focal, "overlap": overlap}


def roi_window_max(a: torch.Tensor, roi: torch.Tensor, window: int) -> torch.Tensor:
    """Per image (B,): the largest mean of A over the ROI pixels of a window x window
    neighbourhood, over windows centred on ROI pixels; 0 for an empty ROI."""
    h, w = a.shape[-2:]
    k = max(1, min(window, (min(h, w) - 1) // 2 * 2 + 1))
    k -= 1 - k % 2  # odd, so the window is centred
    roi = roi.expand_as(a).to(a.dtype)
    if k > 1:
        num = F.avg_pool2d(a * roi, k, 1, k // 2, count_include_pad=False)
        den = F.avg_pool2d(roi, k, 1, k // 2, count_include_pad=False)
        local = num / den.clamp_min(_EPS)
    else:
        local = a
    return (local * roi).flatten(1).amax(dim=1)


# ---------------------------------------------------------------------------- detector
@register
class Grdnet(ReconstructionDetector):
    name: ClassVar[str] = "grdnet"
    config_cls: ClassVar[type[DetectorConfig]] = GrdnetConfig
    config: GrdnetConfig
    uses_roi: ClassVar[bool] = True

    def __init__(self, config: DetectorConfig | dict[str, Any] | None = None, **params: Any) -> None:
        super().__init__(config, **params)
        self.synth = PerlinSynthesizer(probability=self.config.perturb_probability,
                                       source=self.config.perlin_source)

    @property
    def needs_roi(self) -> bool:
        return self.config.roi_mode == "roi"

    def build_networks(self) -> dict[str, nn.Module]:
        net = self.net_config()
        c = self.config
        unet = UNet(channels=c.channels, base_width=c.unet_width, depth=c.unet_depth,
                    max_width=c.unet_max_width)
        return {"generator": EncoderDecoderEncoder(net), "unet": unet,
                "discriminator": Discriminator(net)}

    def optimizer_groups(self) -> dict[str, OptimGroup]:
        """G and the U-Net minimise L_tot together (8.9); D has its own optimizer."""
        betas = (self.config.beta1, 0.999)
        return {"generator": OptimGroup(("generator", "unet"), self.config.lr, betas),
                "discriminator": OptimGroup(("discriminator",), self.config.lr, betas)}

    def fit_dataset(self, dataset: Dataset[Sample] | Sequence[Sample],
                    progress: Progress | None = None, work_dir: str | Path = "training",
                    resume: bool = False) -> Grdnet:
        has_roi = dataset[0].roi is not None
        if self.config.roi_mode == "auto":  # fixed once, like channels
            self.config.roi_mode = "roi" if has_roi else "whole_image"
        elif self.config.roi_mode == "roi" and not has_roi:
            raise ConfigError(f"{self.name}: roi_mode=roi but the training images have no ROIs; "
                              f"add them (ROOT/roi/ or --roi-dir) or set roi_mode=auto")
        super().fit_dataset(dataset, progress, work_dir, resume)
        return self

    # ------------------------------------------------------------------------- steps
    def _roi(self, batch: Batch) -> torch.Tensor | None:
        """The batch's ROIs, or None for the whole image."""
        if self.config.roi_mode == "whole_image":
            return None
        if batch.roi is None:
            raise ConfigError(f"{self.name} trains with ROIs (roi_mode={self.config.roi_mode}) "
                              f"but a batch has none; give every training image an ROI")
        return batch.roi.to(batch.image.dtype)

    def _forward(self, batch: Batch, ctx: StepContext) -> tuple[dict[str, torch.Tensor],
                                                                 torch.Tensor]:
        """Perturb, reconstruct, segment: the losses and X_hat."""
        c = self.config
        x = batch.image
        roi = self._roi(batch)
        p = self.synth(x, roi=roi, generator=ctx.generator)
        if roi is None:
            roi = torch.ones_like(x[:, :1])
        g, u = ctx.nets["generator"], ctx.nets["unet"]
        with ctx.autocast():  # forwards only: the losses (SSIM, focal) stay in fp32
            x_hat, z, z_hat = g(p.images)
            logits = u(p.images, x_hat)
        x_hat, a = x_hat.float(), torch.sigmoid(logits.float())
        terms = {"con": contextual_loss(x, x_hat, c.w_a, c.w_b).mean(),
                 "enc": encoder_loss(z.float(), z_hat.float()).mean(),
                 **roi_losses(a, p.mask, roi, c.roi_loss, c.focal_gamma, c.focal_alpha,
                              c.overlap_weight)}
        return terms, x_hat

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        c = self.config
        x = batch.image
        terms, x_hat = self._forward(batch, ctx)
        terms["adv"] = adversarial_loss(ctx, x, x_hat)
        gan = c.w_adv * terms["adv"] + c.w_con * terms["con"] + c.w_enc * terms["enc"]
        loss = gan + c.w_focal * (terms["focal"] + terms["overlap"])
        ctx.step("generator", loss)
        d_loss = discriminator_step(ctx, x, x_hat)
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()},
                "d_loss": float(d_loss.detach())}

    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        """L_tot without L_adv (which measures D as much as G) on held-out images perturbed
        as in training: the reconstruction and the segmentation both count."""
        c = self.config
        terms, _ = self._forward(batch, ctx)
        loss = c.w_con * terms["con"] + c.w_enc * terms["enc"] + c.w_focal * (
            terms["focal"] + terms["overlap"])
        return {"loss": float(loss), **{k: float(v) for k, v in terms.items()}}

    # --------------------------------------------------------------------- inference
    def infer(self, x: torch.Tensor) -> Prediction:
        return self.infer_roi(x, torch.ones_like(x[:, :1]))

    def infer_roi(self, x: torch.Tensor, roi: torch.Tensor) -> Prediction:
        x_hat = self.nets["generator"].autoencoder(x)  # type: ignore[operator]
        a = torch.sigmoid(self.nets["unet"](x, x_hat))
        roi = torch.ones_like(a) if self.config.roi_mode == "whole_image" else (roi > 0.5).to(a.dtype)
        k = self.config.score_window
        return Prediction(score=roi_window_max(a, roi, k), anomaly_map=a * roi,
                          reconstruction=x_hat,
                          extras={"whole_image_score": roi_window_max(a, torch.ones_like(roi), k)})


__all__ = ["ROI_LOSS_NAMES", "Grdnet", "GrdnetConfig", "outside_loss", "overlap_loss",
           "roi_losses", "roi_window_max"]
