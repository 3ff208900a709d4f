"""Rank images and the inline key-frame batch (thesis 10.2, 10.3, eq. 10.1).

An acquisition is F frames (16 on the line) of a strip that the carrier swings while the
camera stays registered on it. The rank filter keeps, per pixel, the smallest (rank 1) and the
largest (rank F) gray value over the frames. On a back-lit line defects and most nuisances
are darker than what is behind them, so:

- the min image (dark rank) keeps every dark thing that was at that pixel in any frame:
  static defects, and the trails of what moved (bubble rims, free or floating particles,
  foam, the dark band under the surface);
- the max image (light rank) keeps only what was dark in every frame: static things (black
  spots, stuck particles, scratches, the engraving, droplets on the wall). A moving dark
  object vanishes from it as soon as it left each of its pixels in at least one frame.

Bright parts of moving things (the lens spot at a bubble's centre, the reflex above the
surface) do the opposite and show as faint trails in the max image. The thesis sums it up
as "anything that moved appears in the darker images, static regions remain in the lighter".

Inline the line does not have time for all frames: it inspects three key frames (the
first, the eighth and the last, numbered from 1), N = 3 frames x 5 vials x 4 regions = 60
patches, one batch (eq. 10.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from anomalyqc.errors import ConfigError, DataError
from anomalyqc.line.layout import ProductLayout
from anomalyqc.line.patches import cut

KEY_FRAMES: tuple[int, ...] = (1, 8, 16)  # frame numbers, 1-based as in the thesis
RANK_SOURCES: tuple[str, ...] = ("rank_min", "rank_max")

ArrayLike = np.ndarray | torch.Tensor


def rank_images(frames: ArrayLike, frame_axis: int = -3) -> tuple[ArrayLike, ArrayLike]:
    """Per-pixel (min, max) over the frames: (..., F, H, W) -> two (..., H, W), same type and dtype."""
    if frames.shape[frame_axis] < 1:
        raise DataError("rank_images needs at least one frame")
    if isinstance(frames, torch.Tensor):
        return frames.amin(dim=frame_axis), frames.amax(dim=frame_axis)
    return frames.min(axis=frame_axis), frames.max(axis=frame_axis)


def key_frame_indices(n_frames: int, key_frames: tuple[int, ...] = KEY_FRAMES) -> list[int]:
    """0-based indices of the 1-based `key_frames`; -1 means the last frame."""
    out = []
    for k in key_frames:
        i = n_frames - 1 if k == -1 else k - 1
        if not 0 <= i < n_frames:
            raise ConfigError(
                f"key frame {k} does not exist in an acquisition of {n_frames} frames; "
                f"choose key frames between 1 and {n_frames}"
            )
        out.append(i)
    return out


@dataclass
class LineBatch:
    """The patches of one acquisition, in (source, vial, region) order, ready for one forward pass."""

    patches: torch.Tensor  # (N, C, P, P) float32, N = n_sources * n_vials * n_regions
    sources: list[str]  # "frame_<k>" (1-based) or "rank_min"/"rank_max", one per source image
    source: torch.Tensor  # (N,) index into sources
    vial: torch.Tensor  # (N,)
    region: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return int(self.patches.shape[0])


def line_batch(
    frames: ArrayLike,
    layout: ProductLayout,
    key_frames: tuple[int, ...] = KEY_FRAMES,
    rank: bool = False,
    patch_size: int | None = None,
) -> LineBatch:
    """Key frames (and, with `rank`, the two rank images) of one acquisition cut into patches.

    `frames` is (F, H, W) or (F, C, H, W), any numeric dtype (uint8 keeps 0..255). With the
    defaults and a 5-vial, 4-region layout this is the 60-patch batch of eq. 10.1; with `rank`
    it is 100.
    """
    t = torch.as_tensor(frames)
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4:
        raise DataError(f"an acquisition is (F, H, W) or (F, C, H, W) frames, got shape {tuple(t.shape)}")
    idx = key_frame_indices(int(t.shape[0]), key_frames)
    images = [t[i] for i in idx]
    sources = [f"frame_{i + 1}" for i in idx]
    if rank:
        images += [t.amin(dim=0), t.amax(dim=0)]
        sources += list(RANK_SOURCES)
    stack = torch.stack(images).float()
    p = cut(stack, layout, patch_size)  # (S, V, R, C, P, P)
    s, v, r = p.shape[:3]
    grid = torch.stack(torch.meshgrid(torch.arange(s), torch.arange(v), torch.arange(r), indexing="ij"))
    grid = grid.reshape(3, -1)
    return LineBatch(p.reshape(s * v * r, *p.shape[3:]), sources, grid[0], grid[1], grid[2])
