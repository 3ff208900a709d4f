"""Patch-embedding grids from ImageNet-pretrained CNNs (thesis 8.3.5.1-8.3.5.2).

Two mid layers (stride 8 and 16) are each averaged over a p x p neighbourhood, the deeper one
is upsampled to the first one's grid, and the two are concatenated: one embedding per grid
location, shape (B, D, h, w) with h = H / 8.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from anomalyqc.backbones.zoo import BACKBONES, BackboneSpec
from anomalyqc.errors import ConfigError


class FeatureExtractor(nn.Module):
    """Frozen backbone cut after its stride-16 layer, returning the aggregated embedding grid."""

    mean: torch.Tensor  # (1, 3, 1, 1) buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, name: str = "efficientnet_lite0", patch_size: int = 3,
                 allow_download: bool = True, micro_batch: int = 2,
                 channel_pool: int | None = None, pretrained: bool = True) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ConfigError(
                f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}"
            )
        if patch_size < 1 or patch_size % 2 == 0:
            raise ConfigError(f"patch size must be a positive odd number, got {patch_size}")
        spec: BackboneSpec = BACKBONES[name]
        self.name = name
        self.patch_size = patch_size
        self.body, self.channels = spec.build(allow_download, pretrained)
        self.channel_pool = spec.channel_pool if channel_pool is None else channel_pool
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.micro_batch = micro_batch
        # channels_last and small micro-batches: measured 2-3x faster on CPU than NCHW
        # batches of 8-16, whose activations fall out of cache (benchmarks/README.md).
        self.body = self.body.to(memory_format=torch.channels_last)
        self.body.eval()
        for p in self.body.parameters():
            p.requires_grad_(False)

    @property
    def dim(self) -> int:
        """Embedding dimension D: the two layers' channels, or the channel pooling's size."""
        return self.channel_pool or sum(self.channels)

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Batch-norm statistics stay frozen: the extractor is never trained.
        super().train(mode)
        self.body.eval()
        return self

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images, gray or RGB, to the backbone's normalised RGB input."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return (images - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalise(images).contiguous(memory_format=torch.channels_last)
        step = self.micro_batch if self.micro_batch > 0 else x.shape[0]
        parts = []
        for start in range(0, x.shape[0], step):
            mid, deep = self.body(x[start : start + step])
            emb = aggregate(mid, deep, self.patch_size)
            if self.channel_pool:
                emb = pool_channels(emb, self.channel_pool)
            parts.append(emb.contiguous())
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def aggregate(mid: torch.Tensor, deep: torch.Tensor, patch_size: int = 3) -> torch.Tensor:
    """Neighbourhood average (eq. 8.22), upsample the deeper map, concatenate channels."""
    pool: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # noqa: E731
    if patch_size > 1:
        pad = patch_size // 2

        def pool(t: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(t, patch_size, stride=1, padding=pad, count_include_pad=False)

    mid = pool(mid)
    deep = pool(deep)
    if deep.shape[-2:] != mid.shape[-2:]:
        deep = F.interpolate(deep, size=mid.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([mid, deep], dim=1)


def pool_channels(emb: torch.Tensor, out: int) -> torch.Tensor:
    """Adaptive average pooling over the channel axis (thesis 8.3.5.2, as PatchCore): (B, D, h,
    w) -> (B, out, h, w), each output channel the mean of a contiguous run of input channels."""
    b, d, h, w = emb.shape
    if out == d:
        return emb
    x = emb.permute(0, 2, 3, 1).reshape(b * h * w, 1, d)
    x = F.adaptive_avg_pool1d(x, out)
    return x.reshape(b, h, w, out).permute(0, 3, 1, 2)


# Every backbone's mid layer has stride 8: an H x W input gives a grid of about H/8 x W/8
# (each network rounds odd sizes its own way: floor, ceil or by its "same" padding).
GRID_STRIDE = 8


def grid_fits(grid: tuple[int, int], input_size: tuple[int, int]) -> bool:
    """Whether a (h, w) embedding grid can come from (H, W) inputs: within one cell of H/8,
    W/8. Cheap, for loading a model; the exact grid is checked on the first image."""
    return all(abs(g - s / GRID_STRIDE) < 1 for g, s in zip(grid, input_size, strict=True))


@lru_cache(maxsize=16)
def embedding_dim(name: str, channel_pool: int | None = None) -> int:
    """The embedding dimension D of a backbone (with its channel pooling), read from the
    network built on the meta device: no weights are loaded and nothing is allocated."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    spec = BACKBONES[name]
    with torch.device("meta"):
        _body, channels = spec.build(False, False)
    pool = spec.channel_pool if channel_pool is None else channel_pool
    return pool or sum(channels)
