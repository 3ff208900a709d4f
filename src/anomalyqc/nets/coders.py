"""Residual encoder, mirrored decoder, autoencoder and GANomaly's encoder-decoder-encoder
generator (thesis 8.2.2.1-8.2.2.2, 8.2.2.5, figs. 8.2, 8.8, 8.9, 10.3).

Encoder: a stem conv to `base_width` (3x3 at full resolution, or with `stem="strided"` a 4x4
stride-2 conv as DCGAN's first layer, which keeps every feature map off the full resolution:
at 256x256 that is most of a training step's cost), then `stages` stages of `blocks` pre-activation
blocks, the width multiplied by `width_mult` at each stage and H, W halved at its end, then
BN-ReLU and the bottleneck:
  - "conv": a 1x1 conv to `latent_channels` maps (CRAE, e.g. 32x8x8, thesis 9.1.3.1);
  - "dense": flatten + linear to `latent_dim` features (DRAE 2048; ResGANAD 64, fig. 10.3);
  - "none": the feature map itself (discriminator trunks).
The decoder mirrors it with transposed convolutions and ends in a 3x3 conv to the image
channels (a 4x4 stride-2 transposed conv after a strided stem); the autoencoder puts a
sigmoid on that, since images live in [0, 1].
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from anomalyqc.data.transforms import as_hw
from anomalyqc.errors import ConfigError
from anomalyqc.nets.blocks import stage


class NetConfig(BaseModel):
    """Shape of an encoder/decoder pair. Defaults: a small CRAE-like net for 128x128 gray."""

    model_config = ConfigDict(extra="forbid")
    channels: int = Field(1, ge=1)  # image channels in (and out of the decoder)
    image_size: int | tuple[int, int] = 128  # (H, W); an int is a square
    base_width: int = Field(32, ge=1)  # stem width; stage i has base * mult**(i+1)
    width_mult: float = Field(2.0, gt=0)
    max_width: int | None = Field(None, ge=1)  # cap on any stage's width
    stages: int = Field(4, ge=1, le=8)  # each halves H and W
    stem: Literal["conv", "strided"] = "conv"  # "strided" halves H and W once more, first
    blocks: int = Field(2, ge=1)  # blocks per stage (fig. 8.2: 2; figs. 8.8/8.9: 3)
    convs: int = Field(2, ge=1)  # 3x3 convs per block (ResGANAD, 10.5.2: 3)
    residual: bool = True  # False: same layers without shortcuts (the "vanilla" net, 9.1)
    # which block of a stage changes the width: "first" (fig. 8.2), or "last", with the
    # resampling, so a stage's body runs at the narrower width (see presets.resganad_config)
    widen: Literal["first", "last"] = "first"
    bottleneck: Literal["conv", "dense", "none"] = "conv"
    latent_channels: int = Field(32, ge=1)  # conv bottleneck
    latent_dim: int = Field(2048, ge=1)  # dense bottleneck

    @field_validator("image_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int | tuple[int, int]:
        try:
            h, w = as_hw(tuple(v) if isinstance(v, list) else v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return h if h == w else (h, w)

    @model_validator(mode="after")
    def _divisible(self) -> NetConfig:
        h, w = self.hw
        f = 2**self.halvings
        if h % f or w % f:
            what = "(stages + 1, the strided stem)" if self.stem == "strided" else "stages"
            raise ValueError(f"image size {h}x{w} is not divisible by 2**{what} = {f}; "
                             f"use a multiple of {f} or fewer stages")
        return self

    @property
    def halvings(self) -> int:
        """How many times the encoder halves H and W (stages, plus a strided stem)."""
        return self.stages + (self.stem == "strided")

    @property
    def hw(self) -> tuple[int, int]:
        return as_hw(self.image_size)

    def width(self, stage_index: int) -> int:
        """Output width of encoder stage `stage_index`; -1 is the stem."""
        w = max(1, round(self.base_width * self.width_mult ** (stage_index + 1)))
        return min(w, self.max_width) if self.max_width else w

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the last stage's output, before the bottleneck."""
        h, w = self.hw
        f = 2**self.halvings
        return self.width(self.stages - 1), h // f, w // f

    @property
    def latent_shape(self) -> tuple[int, ...]:
        c, h, w = self.feature_shape
        if self.bottleneck == "dense":
            return (self.latent_dim,)
        if self.bottleneck == "conv":
            return (self.latent_channels, h, w)
        return (c, h, w)


def as_config(config: NetConfig | dict[str, Any] | None, **params: Any) -> NetConfig:
    """NetConfig from a config, a dict and/or keywords; bad values raise ConfigError."""
    base = config.model_dump() if isinstance(config, NetConfig) else dict(config or {})
    base.update(params)
    try:
        return NetConfig(**base)
    except ValueError as exc:
        raise ConfigError(f"invalid network parameters: {exc}") from exc


def _check_input(x: torch.Tensor, channels: int, hw: tuple[int, int], what: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels or tuple(x.shape[2:]) != hw:
        raise ValueError(f"{what} expects (B, {channels}, {hw[0]}, {hw[1]}), got {tuple(x.shape)}")


class Encoder(nn.Module):
    """Image (B, C, H, W) -> latent of `config.latent_shape` (per sample)."""

    def __init__(self, config: NetConfig | dict[str, Any] | None = None, **params: Any) -> None:
        super().__init__()
        cfg = self.config = as_config(config, **params)
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.channels, cfg.width(-1), 4, stride=2, padding=1, bias=False)
            if cfg.stem == "strided" else
            nn.Conv2d(cfg.channels, cfg.width(-1), 3, padding=1, bias=False)]
        for i in range(cfg.stages):
            layers.append(stage(cfg.width(i - 1), cfg.width(i), cfg.blocks, "down", cfg.convs,
                                cfg.residual, cfg.widen))
        c, h, w = cfg.feature_shape
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]  # ResNet-V2's final activation
        self.trunk = nn.Sequential(*layers)
        self.bottleneck: nn.Module
        if cfg.bottleneck == "dense":
            self.bottleneck = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, cfg.latent_dim))
        elif cfg.bottleneck == "conv":
            self.bottleneck = nn.Conv2d(c, cfg.latent_channels, 1)
        else:
            self.bottleneck = nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's activated feature map (B, *config.feature_shape)."""
        _check_input(x, self.config.channels, self.config.hw, "encoder")
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.features(x))


class Decoder(nn.Module):
    """Latent -> image logits (B, C, H, W): the encoder mirrored, transposed convs upsampling
    at the end of each stage (fig. 8.9)."""

    def __init__(self, config: NetConfig | dict[str, Any] | None = None, **params: Any) -> None:
        super().__init__()
        cfg = self.config = as_config(config, **params)
        c, h, w = cfg.feature_shape
        self.unbottleneck: nn.Module
        if cfg.bottleneck == "dense":
            self.unbottleneck = nn.Sequential(nn.Linear(cfg.latent_dim, c * h * w),
                                              nn.Unflatten(1, (c, h, w)))
        elif cfg.bottleneck == "conv":
            self.unbottleneck = nn.Conv2d(cfg.latent_channels, c, 1)
        else:
            self.unbottleneck = nn.Identity()
        layers: list[nn.Module] = []
        for i in reversed(range(cfg.stages)):
            layers.append(stage(cfg.width(i), cfg.width(i - 1), cfg.blocks, "up", cfg.convs,
                                cfg.residual, cfg.widen))
        base = cfg.width(-1)
        layers += [nn.BatchNorm2d(base), nn.ReLU(inplace=True),
                   nn.ConvTranspose2d(base, cfg.channels, 4, stride=2, padding=1)
                   if cfg.stem == "strided" else nn.Conv2d(base, cfg.channels, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        want = self.config.latent_shape
        if tuple(z.shape[1:]) != want:
            raise ValueError(f"decoder expects latents (B, {', '.join(map(str, want))}), "
                             f"got {tuple(z.shape)}")
        return self.body(self.unbottleneck(z))


class Autoencoder(nn.Module):
    """Encoder + decoder with a sigmoid output: X -> X_hat in [0, 1]."""

    def __init__(self, config: NetConfig | dict[str, Any] | None = None, **params: Any) -> None:
        super().__init__()
        self.config = as_config(config, **params)
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.encoder(x)))


class EncoderDecoderEncoder(nn.Module):
    """GANomaly's generator (8.2.2.1): X -> z -> X_hat -> z_hat, for L_con on (X, X_hat)
    and L_enc on (z, z_hat). At inference only the autoencoder part is needed."""

    def __init__(self, config: NetConfig | dict[str, Any] | None = None, **params: Any) -> None:
        super().__init__()
        self.config = as_config(config, **params)
        self.autoencoder = Autoencoder(self.config)
        self.encoder2 = Encoder(self.config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.autoencoder.encoder(x)
        x_hat = torch.sigmoid(self.autoencoder.decoder(z))
        return x_hat, z, self.encoder2(x_hat)
