"""U-Net discriminative network of DRAEM and GRD-Net (thesis 8.2.2.3-8.2.2.4, fig. 8.4).

It reads the channel-wise concatenation of the (perturbed) image and its reconstruction,
(B, 2C, H, W), and returns one anomaly-mask logit per pixel, (B, 1, H, W): the sigmoid of
it is A_discr, which GRD-Net multiplies by the ROI (I = A x ROI, eq. 8.8) before the focal
loss. Levels are conv-BN-ReLU pairs as in DRAEM; the width doubles per level up to a cap.
With inputs=1 it reads the image alone (C channels): the supervised segmentation U-Net
(models.unet).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from anomalyqc.errors import ConfigError


class UNetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: int = Field(1, ge=1)  # image channels C; the network reads inputs x C
    inputs: int = Field(2, ge=1, le=2)  # 2: image and reconstruction; 1: the image alone
    base_width: int = Field(32, ge=1)  # DRAEM uses 64
    depth: int = Field(4, ge=1, le=8)  # number of 2x downsamplings; H, W must divide 2**depth
    max_width: int = Field(512, ge=1)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.fuse = _double_conv(2 * cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """(image, reconstruction) -> mask logits (B, 1, H, W); (image,) when inputs=1."""

    def __init__(self, config: UNetConfig | dict[str, Any] | None = None, **params: Any) -> None:
        super().__init__()
        base = config.model_dump() if isinstance(config, UNetConfig) else dict(config or {})
        base.update(params)
        try:
            cfg = self.config = UNetConfig(**base)
        except ValueError as exc:
            raise ConfigError(f"invalid U-Net parameters: {exc}") from exc
        widths = [min(cfg.base_width * 2**i, cfg.max_width) for i in range(cfg.depth + 1)]
        self.inc = _double_conv(cfg.inputs * cfg.channels, widths[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), _double_conv(widths[i], widths[i + 1]))
            for i in range(cfg.depth)
        )
        self.up = nn.ModuleList(_Up(widths[i + 1], widths[i]) for i in reversed(range(cfg.depth)))
        self.out = nn.Conv2d(widths[0], 1, 1)

    def forward(self, image: torch.Tensor, reconstruction: torch.Tensor | None = None) -> torch.Tensor:
        if (reconstruction is None) != (self.config.inputs == 1):
            raise ValueError(f"this U-Net reads {self.config.inputs} input(s): "
                             + ("image and reconstruction" if self.config.inputs == 2 else "the image alone"))
        if reconstruction is None:
            reconstruction = image
        if image.shape != reconstruction.shape or image.ndim != 4 or image.shape[1] != self.config.channels:
            raise ValueError(f"U-Net expects image and reconstruction of the same shape "
                             f"(B, {self.config.channels}, H, W), got {tuple(image.shape)} and "
                             f"{tuple(reconstruction.shape)}")
        f = 2**self.config.depth
        if image.shape[2] % f or image.shape[3] % f:
            raise ConfigError(f"U-Net input {image.shape[2]}x{image.shape[3]} is not divisible by "
                              f"2**depth = {f}; resize to a multiple of {f} or lower the depth")
        x = self.inc(image if self.config.inputs == 1 else torch.cat([image, reconstruction], dim=1))
        skips = [x]
        for down in self.down:
            x = down(x)
            skips.append(x)
        skips.pop()
        for up in self.up:
            x = up(x, skips.pop())
        return self.out(x)
