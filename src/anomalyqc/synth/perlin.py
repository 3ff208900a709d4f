"""Perlin-noise anomaly synthesis P_q(X) (thesis 8.2.2.3, fig. 8.3; eq. 8.11).

Training images of the reconstruction family are corrupted on the fly with blobs of
"just out of distribution" content, so the networks learn to restore good appearance (and
the discriminative U-Nets learn to segment what was changed). For every image, with
probability q:

    M  = [perlin(x, y) > t]          (x ROI when one is given)
    X* = (1 - M) X + (1 - beta) M X + beta N,   beta ~ U(0.5, 1),  N = noise isolated by M

The other images come back unchanged with M = 0, N = 0 and beta = 0. The noise source N is
uniform random pixels (the thesis's DRAEM variant, fig. 8.3b), texture from another image of
the batch, or texture images from a user folder.

Everything is vectorised over the batch in torch (one gather per lattice corner, no Python
loop over images or pixels) and deterministic under a torch.Generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from anomalyqc.data.io import list_images, read_image
from anomalyqc.errors import ConfigError, DataError


class PerlinConfig(BaseModel):
    """Parameters of P_q. Defaults follow the thesis (q = 0.75, beta in [0.5, 1]) and, where
    it is silent (scales, threshold, rotation), DRAEM, whose simulator the thesis adopts."""

    model_config = ConfigDict(extra="forbid")
    probability: float = Field(0.75, ge=0.0, le=1.0)  # q: share of images that get noise
    min_scale_log2: int = Field(0, ge=0, le=10)  # lattice cells per axis: 2**k, k drawn per
    max_scale_log2: int = Field(5, ge=0, le=10)  # image and axis in [min, max]
    threshold: float = Field(0.5, gt=-1.0, lt=1.0)  # noise > threshold is in the mask
    beta_range: tuple[float, float] = (0.5, 1.0)
    rotate: bool = True  # rotate the noise field by U(-90, 90) degrees, as DRAEM does
    source: Literal["uniform", "texture", "folder"] = "uniform"
    texture_dir: Path | None = None  # source == "folder": images resized to the input size
    # A threshold can leave no pixel above it (coarse lattices, small ROIs): redraw the noise
    # of those images this many times before returning them unchanged.
    max_tries: int = Field(4, ge=1, le=100)

    @model_validator(mode="after")
    def _check(self) -> PerlinConfig:
        if self.min_scale_log2 > self.max_scale_log2:
            raise ValueError("min_scale_log2 must not exceed max_scale_log2")
        lo, hi = self.beta_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError("beta_range must satisfy 0 <= low <= high <= 1")
        if (self.source == "folder") != (self.texture_dir is not None):
            raise ValueError("texture_dir is needed with source='folder', and only then")
        return self


@dataclass(frozen=True)
class Perturbed:
    """Output of P_q: X* (B, C, H, W), M (B, 1, H, W) in {0, 1}, the isolated noise N*M
    (B, C, H, W) and beta (B,), 0 for images left unchanged (so beta N M = 0 there too)."""

    images: torch.Tensor
    mask: torch.Tensor
    noise: torch.Tensor
    beta: torch.Tensor

    @property
    def applied(self) -> torch.Tensor:
        """(B,) bool: which images carry an anomaly."""
        return self.mask.flatten(1).amax(dim=1) > 0


def _rand(shape: tuple[int, ...], gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U(0, 1) drawn on the generator's device (a CPU generator cannot fill a CUDA tensor),
    then moved: the same seed gives the same noise on every device."""
    src = gen.device if gen is not None else device
    return torch.rand(shape, generator=gen, device=src).to(device)


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)  # Perlin's 6t^5 - 15t^4 + 10t^3


def perlin_noise(
    batch: int,
    size: tuple[int, int],
    scales: torch.Tensor,
    gen: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Gradient noise (B, H, W) in [-1, 1], one lattice per image.

    scales (B, 2) holds the number of lattice cells along (H, W) for each image; unit
    gradients at random angles sit on a (max+1)^2 lattice per image, of which each image
    uses its own top-left part. Each pixel gathers its four corner gradients at once.
    """
    device = torch.device(device)
    h, w = size
    scales = scales.to(device=device, dtype=torch.long)
    r = int(scales.max().item()) + 1
    angles = 2 * math.pi * _rand((batch, r * r), gen, device)
    grad_y, grad_x = torch.sin(angles), torch.cos(angles)  # (B, r*r)

    # Lattice coordinate of every pixel centre along each axis: (B, H) and (B, W).
    uy = (torch.arange(h, device=device) + 0.5) / h * scales[:, :1]
    ux = (torch.arange(w, device=device) + 0.5) / w * scales[:, 1:]
    iy, ix = uy.floor().long(), ux.floor().long()
    fy, fx = (uy - iy)[:, :, None], (ux - ix)[:, None, :]  # (B, H, 1), (B, 1, W)

    def corner(dy: int, dx: int) -> torch.Tensor:
        idx = ((iy + dy)[:, :, None] * r + (ix + dx)[:, None, :]).flatten(1)  # (B, H*W)
        gy = torch.gather(grad_y, 1, idx).view(batch, h, w)
        gx = torch.gather(grad_x, 1, idx).view(batch, h, w)
        return gy * (fy - dy) + gx * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    return math.sqrt(2) * torch.lerp(top, bottom, ty)  # 2-D gradient noise peaks at 1/sqrt(2)


def _rotate(field: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Rotate each (H, W) field by its own angle in [-90, 90] degrees (reflected borders)."""
    b = field.shape[0]
    theta = (_rand((b,), gen, field.device) - 0.5) * math.pi
    cos, sin, zero = torch.cos(theta), torch.sin(theta), torch.zeros_like(theta)
    affine = torch.stack([cos, -sin, zero, sin, cos, zero], dim=1).view(b, 2, 3)
    grid = F.affine_grid(affine, [b, 1, *field.shape[1:]], align_corners=False)
    out = F.grid_sample(field[:, None], grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    return out[:, 0]


class PerlinSynthesizer:
    """P_q as a callable; keeps the folder textures in memory once read."""

    def __init__(self, config: PerlinConfig | None = None, **params: object) -> None:
        base = config.model_dump() if config is not None else {}
        base.update(params)
        try:
            self.config = PerlinConfig(**base)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise ConfigError(f"invalid Perlin synthesis parameters: {exc}") from exc
        self._textures: dict[tuple[int, int, int], torch.Tensor] = {}

    def masks(
        self, batch: int, size: tuple[int, int], gen: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Thresholded Perlin masks (B, 1, H, W) in {0, 1}, scales drawn per image."""
        cfg = self.config
        device = torch.device(device)
        span = cfg.max_scale_log2 - cfg.min_scale_log2 + 1
        k = cfg.min_scale_log2 + (_rand((batch, 2), gen, device) * span).long().clamp(max=span - 1)
        noise = perlin_noise(batch, size, 2**k, gen, device)
        if cfg.rotate:
            noise = _rotate(noise, gen)
        return (noise > cfg.threshold).to(torch.float32)[:, None]

    def __call__(
        self,
        images: torch.Tensor,
        roi: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Perturbed:
        """Apply P_q to images (B, C, H, W) in [0, 1]; roi (B or 1, 1, H, W) restricts M."""
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        cfg = self.config
        b, c, h, w = images.shape
        device = images.device
        gen = generator
        if roi is not None and (roi.ndim != 4 or roi.shape[0] not in (1, b) or roi.shape[1] != 1
                                or tuple(roi.shape[2:]) != (h, w)):
            raise ValueError(f"roi must be (1 or {b}, 1, {h}, {w}) like the images, "
                             f"got {tuple(roi.shape)}")
        apply = _rand((b,), gen, device) < cfg.probability
        lo, hi = cfg.beta_range
        beta = lo + (hi - lo) * _rand((b,), gen, device)
        source = self._source(images, gen)  # drawn before the masks: retries don't shift it

        mask = torch.zeros(b, 1, h, w, device=device, dtype=images.dtype)
        todo = apply.clone()
        for _ in range(cfg.max_tries):  # redraws only images whose mask came out empty
            n = int(todo.sum())
            if n == 0:
                break
            new = self.masks(n, (h, w), gen, device)
            if roi is not None:
                new = new * roi.to(new).expand(b, 1, h, w)[todo]
            mask[todo] = new
            todo = todo & (mask.flatten(1).amax(dim=1) == 0)

        applied = mask.flatten(1).amax(dim=1) > 0
        beta = torch.where(applied, beta, torch.zeros_like(beta)).to(images.dtype)
        noise = source * mask
        bb = beta.view(b, 1, 1, 1)
        out = (1 - mask) * images + (1 - bb) * mask * images + bb * noise  # eq. 8.11
        return Perturbed(images=out, mask=mask, noise=noise, beta=beta)

    def _source(self, images: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """The fill N for every image, full size; the mask isolates it later."""
        b, c, h, w = images.shape
        kind = self.config.source
        if kind == "uniform":
            return _rand((b, c, h, w), gen, images.device).to(images.dtype)
        if kind == "texture":
            # Another image of the batch, flipped too, so that the blob does not copy the
            # pixels it covers (a batch of one borrows its own flipped self).
            u = float(_rand((1,), gen, torch.device("cpu")).item())
            shift = 1 + min(int(u * (b - 1)), b - 2) if b > 1 else 0
            return images.roll(shifts=shift, dims=0).flip(dims=(2, 3))
        textures = self._folder_textures(c, h, w).to(images.device, images.dtype)
        pick = (_rand((b,), gen, images.device) * len(textures)).long().clamp(max=len(textures) - 1)
        return textures[pick]

    def _folder_textures(self, c: int, h: int, w: int) -> torch.Tensor:
        key = (c, h, w)
        if key not in self._textures:
            folder = self.config.texture_dir
            assert folder is not None  # the config validator guarantees it for "folder"
            paths = list_images(folder)
            if not paths:
                raise DataError(f"texture folder {folder} has no images; add PNG/JPEG textures or "
                                "use source='uniform'")
            arrays = [read_image(p, channels=c) for p in paths]
            tensors = [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None] for a in arrays]
            resized = [F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False,
                                     antialias=True) for t in tensors]
            self._textures[key] = torch.cat(resized).clamp_(0, 1)
        return self._textures[key]


def perturb(
    images: torch.Tensor,
    config: PerlinConfig | None = None,
    roi: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Perturbed:
    """One-call P_q(X); build a PerlinSynthesizer to reuse folder textures across batches."""
    return PerlinSynthesizer(config)(images, roi=roi, generator=generator)
