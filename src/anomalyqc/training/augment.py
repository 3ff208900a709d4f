"""Training augmentations: random rotation and vertical flip, on the whole batch at once.

One affine grid per sample (rotation within +-max_angle, flip with probability 1/2) drives
`grid_sample` for the image (bilinear) and for the defect mask and ROI (nearest, so they stay
binary): the three stay geometrically in step. Angles and flips come from the generator the
caller passes, so a step's augmentation is a pure function of its seed (resume reproduces it).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from anomalyqc.errors import ConfigError
from anomalyqc.types import Batch

PADDING = ("zeros", "border", "reflection")


def affine_params(n: int, max_angle: float, vflip: bool, generator: torch.Generator,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample angles (radians, uniform in +-max_angle) and flip signs (-1 flips)."""
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    angles = (2 * u[:, 0] - 1) * max_angle
    signs = torch.where(u[:, 1] < 0.5, -1.0, 1.0) if vflip else torch.ones(n, dtype=torch.float64)
    return angles, signs


def _grid(angles: torch.Tensor, signs: torch.Tensor, h: int, w: int,
          device: torch.device) -> torch.Tensor:
    """Sampling grid rotating each image by its angle about the centre (in pixels, so a
    non-square image is not sheared), after flipping it vertically where sign is -1."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    # output (x, y) -> input (x', y') in normalised coordinates; y' is negated by the flip
    theta = torch.zeros(len(angles), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * h / w
    theta[:, 1, 0] = sin * w / h * signs
    theta[:, 1, 1] = cos * signs
    return F.affine_grid(theta.float(), [len(angles), 1, h, w], align_corners=False).to(device)


def augment_batch(batch: Batch, max_angle: float, vflip: bool, generator: torch.Generator,
                  padding: str = "reflection") -> Batch:
    """The batch rotated and flipped; image, mask and ROI identically. A no-op (the same
    batch) when max_angle is 0 and vflip is off."""
    if max_angle < 0 or max_angle > math.pi:
        raise ConfigError(f"rotation must be within [0, pi] radians, got {max_angle}")
    if padding not in PADDING:
        raise ConfigError(f"augmentation padding must be one of {', '.join(PADDING)}, got {padding!r}")
    if max_angle == 0 and not vflip:
        return batch
    angles, signs = affine_params(len(batch), max_angle, vflip, generator)
    return warp_batch(batch, angles, signs, padding)


def warp_batch(batch: Batch, angles: torch.Tensor, signs: torch.Tensor,
               padding: str = "reflection") -> Batch:
    """Rotate sample i by angles[i] after flipping it vertically where signs[i] is -1."""
    _, _, h, w = batch.image.shape
    grid = _grid(angles, signs, h, w, batch.image.device)

    def warp(t: torch.Tensor | None, mode: str) -> torch.Tensor | None:
        if t is None:
            return None
        out = F.grid_sample(t.float(), grid, mode=mode, padding_mode=padding, align_corners=False)
        return out.to(t.dtype)

    image = warp(batch.image, "bilinear")
    assert image is not None
    return replace(batch, image=image, mask=warp(batch.mask, "nearest"),
                   roi=warp(batch.roi, "nearest"))
