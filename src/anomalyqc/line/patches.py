"""Cut strips into region patches and paste patch heatmaps back into a strip heatmap.

Both directions handle every box of a batch in one vectorised call: cutting is a single
`torchvision.ops.roi_align` over all B x n_vials x n_regions boxes (bilinear, averaging
`ceil(box / patch)` samples per output pixel when it shrinks); pasting is a precomputed
bilinear gather from the patches into the box pixels. When the patch size equals a box's size
both are exact copies, so cut-then-paste returns the strip inside the boxes bit for bit.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torchvision.ops import roi_align

from anomalyqc.errors import DataError
from anomalyqc.line.layout import ProductLayout


def _check_size(layout: ProductLayout, h: int, w: int, what: str) -> None:
    if (h, w) != layout.image_size:
        raise DataError(
            f"{what} are {h}x{w} (height x width) but layout {layout.name!r} expects "
            f"{layout.image_height}x{layout.image_width}; use the layout of this product"
        )


def cut(images: torch.Tensor, layout: ProductLayout, patch_size: int | None = None) -> torch.Tensor:
    """Region patches of a batch of strips: (B, C, H, W) -> (B, n_vials, n_regions, C, P, P).

    Output is float32 (uint8 input keeps its 0..255 scale). `patch_size` defaults to the
    layout's.
    """
    if images.ndim != 4:
        raise DataError(f"cut expects strips as (B, C, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    _check_size(layout, h, w, "strip images")
    p = int(patch_size or layout.patch_size)
    boxes = torch.as_tensor(layout.boxes().reshape(-1, 4), dtype=torch.float32, device=images.device)
    k = boxes.shape[0]
    idx = torch.arange(b, dtype=torch.float32, device=images.device).repeat_interleave(k)[:, None]
    rois = torch.cat([idx, boxes.repeat(b, 1)], dim=1)
    # aligned=True: pixel i spans [i, i + 1), so a half-open integer box is the exact region.
    out = roi_align(images.float(), rois, (p, p), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out.reshape(b, layout.n_vials, layout.n_regions, c, p, p)


@lru_cache(maxsize=16)
def _paste_plan(boxes_key: bytes, n_boxes: int, p: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """Destination pixel and the 4 bilinear source taps of every box pixel (cached per layout)."""
    boxes = np.frombuffer(boxes_key, np.int64).reshape(n_boxes, 4)
    dst, taps, wts = [], [], []
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        bw, bh = int(x1 - x0), int(y1 - y0)
        # centre of box pixel j, in patch pixel coordinates (align_corners=False convention)
        u = np.clip((np.arange(bw) + 0.5) * p / bw - 0.5, 0, p - 1)
        v = np.clip((np.arange(bh) + 0.5) * p / bh - 0.5, 0, p - 1)
        u0, v0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
        u1, v1 = np.minimum(u0 + 1, p - 1), np.minimum(v0 + 1, p - 1)
        fu, fv = (u - u0)[None, :], (v - v0)[:, None]
        base = k * p * p
        t = [base + v0[:, None] * p + u0[None, :], base + v0[:, None] * p + u1[None, :],
             base + v1[:, None] * p + u0[None, :], base + v1[:, None] * p + u1[None, :]]  # fmt: skip
        wt = [(1 - fv) * (1 - fu), (1 - fv) * fu, fv * (1 - fu), fv * fu]
        yy, xx = np.meshgrid(np.arange(y0, y1), np.arange(x0, x1), indexing="ij")
        dst.append((yy * w + xx).ravel())
        taps.append(np.stack([np.broadcast_to(a, (bh, bw)).ravel() for a in t]))
        wts.append(np.stack([np.broadcast_to(a, (bh, bw)).ravel() for a in wt]))
    return (
        torch.from_numpy(np.concatenate(dst)),
        torch.from_numpy(np.concatenate(taps, axis=1)),
        torch.from_numpy(np.concatenate(wts, axis=1).astype(np.float32)),
    )


def paste(patch_maps: torch.Tensor, layout: ProductLayout, fill: float = 0.0) -> torch.Tensor:
    """Strip heatmaps from patch heatmaps: (B, V, R, P, P) or (B, V, R, 1, P, P) -> (B, 1, H, W).

    Each patch is resized bilinearly to its box; pixels outside every box get `fill`. Where
    boxes overlap (allow_overlap) a pixel keeps the largest score.
    """
    if patch_maps.ndim == 6 and patch_maps.shape[3] == 1:
        patch_maps = patch_maps[:, :, :, 0]
    if patch_maps.ndim != 5 or patch_maps.shape[1:3] != (layout.n_vials, layout.n_regions):
        raise DataError(
            f"paste expects (B, {layout.n_vials}, {layout.n_regions}, P, P) patch maps for layout "
            f"{layout.name!r}, got shape {tuple(patch_maps.shape)}"
        )
    b, _, _, p, p2 = patch_maps.shape
    if p != p2:
        raise DataError(f"paste expects square patch maps, got {p}x{p2}")
    h, w = layout.image_size
    boxes = layout.boxes().reshape(-1, 4).astype(np.int64)
    dst, taps, wts = _paste_plan(boxes.tobytes(), boxes.shape[0], p, h, w)
    dev = patch_maps.device
    src = patch_maps.reshape(b, -1).float()
    vals = (src[:, taps.to(dev)] * wts.to(dev)).sum(dim=1)  # (B, n_pixels)
    out = torch.full((b, h * w), float(fill), dtype=torch.float32, device=dev)
    out.scatter_reduce_(1, dst.to(dev).expand(b, -1), vals, reduce="amax", include_self=False)
    return out.reshape(b, 1, h, w)


def region_labels(masks: np.ndarray | torch.Tensor, layout: ProductLayout) -> np.ndarray:
    """Which boxes hold any nonzero mask pixel: (..., H, W) -> (..., n_vials, n_regions) bool.

    One integral image per mask, then four look-ups per box (no loop over pixels or boxes).
    """
    m = np.asarray(masks.cpu() if isinstance(masks, torch.Tensor) else masks) != 0
    _check_size(layout, m.shape[-2], m.shape[-1], "masks")
    ii = np.zeros((*m.shape[:-2], m.shape[-2] + 1, m.shape[-1] + 1), np.int64)
    ii[..., 1:, 1:] = m.cumsum(-2).cumsum(-1)
    x0, y0, x1, y1 = np.moveaxis(layout.boxes(), -1, 0)
    s = ii[..., y1, x1] - ii[..., y0, x1] - ii[..., y1, x0] + ii[..., y0, x0]
    return np.asarray(s > 0)
