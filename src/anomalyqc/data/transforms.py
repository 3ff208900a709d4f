"""Resize and centre-crop for images, masks and ROIs, kept geometrically in step.

Images are float32 (H, W, C) numpy arrays; masks and ROIs are (H, W) 0/1 arrays. The same
geometry is applied to all three so that a defect mask still covers the defect after the
image is resized and cropped. Masks use nearest neighbour so they stay binary.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from anomalyqc.data.notes import InputNotes
from anomalyqc.errors import ConfigError

Size = int | tuple[int, int]
# Resizing that changes the aspect ratio by more than this factor gets a warning: defects
# are stretched as much, and the model sees shapes it never saw at fit time.
MAX_STRETCH = 2.0
_CHANNEL_NAMES = {1: "gray", 3: "RGB"}


def as_hw(size: Size, what: str = "size") -> tuple[int, int]:
    """An int means a square; a pair is (height, width). Both must be positive."""
    if isinstance(size, (int, np.integer)):
        size = (size, size)
    hw = tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(hw) != 2 or not all(_is_positive_int(v) for v in hw):
        raise ConfigError(f"{what} must be a positive int or (height, width), got {size!r}")
    return int(hw[0]), int(hw[1])


def _is_positive_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and bool(v > 0)


def check_channels(channels: int | None) -> None:
    """Only gray (1) and RGB (3) are supported, or None for 'as in the file'."""
    if channels not in (None, 1, 3):
        raise ConfigError(f"channels must be 1 (gray), 3 (RGB) or None, got {channels!r}")


def convert_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Convert a float (H, W, C) image between gray (C=1) and RGB (C=3)."""
    check_channels(channels)
    if img.shape[2] == channels:
        return img
    if channels == 1:
        return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None]
    return np.repeat(img, 3, axis=2)


def convert_noted(
    img: np.ndarray, channels: int, notes: InputNotes, source: str | Path | None
) -> np.ndarray:
    """convert_channels, with a warning (once per `notes`) when it changes anything: a gray
    model given RGB images, or the reverse, is usually a mix-up worth a line."""
    have = img.shape[2]
    if have == channels:
        return img
    notes.warn(
        "channels",
        f"{_name(source)} is {_CHANNEL_NAMES.get(have, f'{have}-channel')} but the model "
        f"takes {_CHANNEL_NAMES[channels]} (channels={channels}): converted to "
        f"{_CHANNEL_NAMES[channels]}",
    )
    return convert_channels(img, channels)


def check_stretch(
    shape: tuple[int, ...], size: Size, notes: InputNotes, source: str | Path | None
) -> None:
    """Warn (once per `notes`) when resizing to `size` changes the aspect ratio by more
    than MAX_STRETCH (a 20x4000 image squeezed into 256x256)."""
    h, w = shape[:2]
    th, tw = as_hw(size)
    ratio = (w / h) / (tw / th)
    factor = max(ratio, 1 / ratio)
    if factor > MAX_STRETCH:
        notes.warn(
            "aspect",
            f"{_name(source)} is {h}x{w} (HxW) and is resized to {th}x{tw}: its aspect ratio "
            f"changes by a factor of {factor:.3g} (more than {MAX_STRETCH:g}), which "
            "stretches defects as much; fit with an --image-size HxW closer to the images' "
            "proportions, or crop the images to the part that matters",
        )


def _name(source: str | Path | None) -> str:
    return f"image {source}" if source is not None else "an image"


def resize_image(img: np.ndarray, size: Size) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) image to `size`, keeping its channel axis.

    INTER_AREA when shrinking (averages pixels, no aliasing of fine texture that could look
    like a defect), INTER_LINEAR when growing in either direction.
    """
    h, w = as_hw(size)
    if img.shape[:2] == (h, w):
        return img.copy()
    shrinking = h <= img.shape[0] and w <= img.shape[1]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    out = cv2.resize(img, (w, h), interpolation=interp)
    return _restore_channel_axis(out, img)


def resize_mask(mask: np.ndarray, size: Size) -> np.ndarray:
    """Nearest-neighbour resize so a 0/1 mask stays 0/1.

    INTER_NEAREST_EXACT rather than INTER_NEAREST: the latter samples with a half-pixel
    shift, which would move small defect masks off their defects.
    """
    h, w = as_hw(size)
    if mask.shape[:2] == (h, w):
        return mask.copy()
    out = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
    return _restore_channel_axis(out, mask)


def center_crop(arr: np.ndarray, size: Size) -> np.ndarray:
    """The central `size` window of an (H, W, ...) array."""
    h, w = as_hw(size, "crop size")
    ah, aw = arr.shape[:2]
    if h > ah or w > aw:
        raise ConfigError(f"crop size {(h, w)} is larger than the image {(ah, aw)}")
    top, left = (ah - h) // 2, (aw - w) // 2
    return arr[top : top + h, left : left + w]


def _restore_channel_axis(out: np.ndarray, original: np.ndarray) -> np.ndarray:
    """cv2.resize drops a trailing axis of length 1; put it back."""
    if original.ndim == 3 and out.ndim == 2:
        return out[..., None]
    return out


class ImageTransform:
    """Resize to `image_size`, then optionally centre-crop to `crop_size`, as tensors.

    image_size / crop_size: int for a square, or (height, width). channels: convert images
    to 1 (gray) or 3 (RGB); None leaves them as read. Images come out (C, H, W) float32,
    masks and ROIs (1, H, W) float32 in {0, 1}. `notes` collects the warnings about odd
    input (channel conversion, strong stretch), each said once per transform, which is
    once per dataset or predict run.
    """

    def __init__(
        self, image_size: Size, crop_size: Size | None = None, channels: int | None = None
    ) -> None:
        check_channels(channels)
        self.image_size = as_hw(image_size, "image size")
        self.crop_size = as_hw(crop_size, "crop size") if crop_size is not None else None
        if self.crop_size and (
            self.crop_size[0] > self.image_size[0] or self.crop_size[1] > self.image_size[1]
        ):
            raise ConfigError(
                f"crop size {self.crop_size} must not exceed image size {self.image_size}"
            )
        self.channels = channels
        self.notes = InputNotes()

    @property
    def output_size(self) -> tuple[int, int]:
        """(H, W) of every tensor this transform returns."""
        return self.crop_size or self.image_size

    def image(self, img: np.ndarray, source: str | Path | None = None) -> torch.Tensor:
        """float (H, W, C) array -> (C, h, w) float32 tensor. `source` (the file) only
        names the image in warnings."""
        if self.channels is not None:
            img = convert_noted(img, self.channels, self.notes, source)
        check_stretch(img.shape, self.image_size, self.notes, source)
        img = self._crop(resize_image(img, self.image_size))
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        """0/1 (H, W) array -> (1, h, w) float32 tensor, still 0/1."""
        mask = self._crop(resize_mask(mask, self.image_size))
        return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)[None])

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray | None = None,
        roi: np.ndarray | None = None,
        source: str | Path | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Transform an image and, with the same geometry, its mask and ROI."""
        return (
            self.image(image, source),
            self.mask(mask) if mask is not None else None,
            self.mask(roi) if roi is not None else None,
        )

    def _crop(self, arr: np.ndarray) -> np.ndarray:
        return center_crop(arr, self.crop_size) if self.crop_size else arr

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, crop_size={self.crop_size}, "
            f"channels={self.channels})"
        )
