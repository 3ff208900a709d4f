"""Blob analysis: the classical machine-vision baseline every learned detector must beat
(issue 10; thesis chapter 7). OpenCV, no learning beyond one number.

Per image (gray: the mean of the channels, values in [0, 1]):

1. Background flattening: the residual r is what stands out of a smooth background,
   - "median": background = median blur of side `background_size`,
   - "gaussian": background = Gaussian blur (sigma = background_size / 6),
   - "tophat": morphological top-hat (bright) / black-hat (dark), ellipse of that side;
   r = background - image for dark defects, image - background for bright ones, the larger
   of the two for "both"; negative values are clipped to 0.
   With `adaptive`, r is divided by its local RMS over `adaptive_window` (plus `adaptive_floor`),
   so the threshold follows the local texture (a threshold in units of local noise).
2. Threshold: pixels with r >= t. t is `threshold` when set, else learnt by `fit` on good
   images: the `threshold_percentile` percentile of every good image's residual (over all
   their pixels; see Blob.fit for when it is exact) times `threshold_margin`. Out of the
   box: at 99.9 about one good pixel in a thousand passes, and the area and shape filters
   remove those specks.
3. Morphology: an opening (removes specks narrower than `open_size`) then a closing (joins
   pieces of one defect closer than `close_size`); ellipse kernels, 0 = skipped.
4. Connected components (8-connected), kept when every filter passes: area in [min_area,
   max_area] pixels, contrast (mean r / t over the blob) >= min_contrast, circularity
   4 pi A / P^2 >= min_circularity and elongation (ratio of the principal axes from the
   second moments) <= max_elongation.

Outputs, in units of t (so 1 is "at threshold"):
- score: for an image with surviving blobs, 1 + max over blobs of contrast x sqrt(area)
  (a large, dark blob outranks a faint speck); without any, q / (1 + q) with q = max r / t,
  so images without blobs are still ranked by their strongest residual, always below 1,
  below every image with a blob.
- anomaly map: 1 + r / t on the surviving blobs, (r / t) / (1 + r / t) elsewhere: blob
  pixels rank above all others, the rest by residual, so pixel AUROC and AUPRO are
  meaningful.
- extras["n_blobs"]: surviving blobs per image.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
import torch
from pydantic import Field, model_validator

from anomalyqc.errors import ConfigError
from anomalyqc.models.base import Detector, DetectorConfig, images_of, register
from anomalyqc.progress import Progress, tracked
from anomalyqc.types import Batch, Prediction


class BlobConfig(DetectorConfig):
    # 1. flattening
    background: Literal["median", "gaussian", "tophat"] = "median"
    background_size: int = Field(15, ge=3)  # px at input size; odd (an even side is made odd)
    polarity: Literal["dark", "bright", "both"] = "dark"
    adaptive: bool = False
    adaptive_window: int = Field(31, ge=3)  # px; side of the local RMS window
    adaptive_floor: float = Field(0.01, gt=0)  # added to the local RMS (flat areas)
    # 2. threshold (in residual units, or local-RMS units with adaptive); None: learnt by fit
    threshold: float | None = Field(None, gt=0)
    threshold_percentile: float = Field(99.9, gt=0, lt=100)
    threshold_margin: float = Field(1.0, gt=0)
    # 3. morphology (ellipse sides in px; 0 = none)
    open_size: int = Field(0, ge=0)
    close_size: int = Field(3, ge=0)
    # 4. blob filters
    min_area: int = Field(4, ge=1)  # px at input size
    max_area: int | None = Field(None, ge=1)
    min_contrast: float = Field(0.0, ge=0)  # mean r / t over the blob
    min_circularity: float = Field(0.0, ge=0, le=1)
    max_elongation: float | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _area_range(self) -> BlobConfig:
        if self.max_area is not None and self.max_area < self.min_area:
            raise ValueError(f"max_area {self.max_area} is below min_area {self.min_area}")
        return self


# fit keeps, per image, FIT_SHARE times its share of the pixels above the percentile
# (plus FIT_EXTRA): room for images that hold more than their share of the highest residuals.
FIT_SHARE, FIT_EXTRA = 8, 256


def _odd(n: int) -> int:
    return n if n % 2 else n + 1


def _ellipse(side: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))


def _pixel_count_for(total: int, percentile: float) -> int:
    """How many of `total` pixels lie at or above the percentile (at least one)."""
    return max(1, math.ceil(total * (1 - percentile / 100)))


@register
class Blob(Detector):
    """Background flattening, threshold, morphology, connected components and filters (see
    the module docstring); fit learns the threshold from good images."""

    name: ClassVar[str] = "blob"
    config_cls: ClassVar[type[DetectorConfig]] = BlobConfig
    config: BlobConfig

    def __init__(self, config: DetectorConfig | dict[str, Any] | None = None, **params: Any) -> None:
        super().__init__(config, **params)
        self.learnt_threshold: float | None = None
        self.fit_report: dict[str, Any] = {}

    @property
    def threshold_value(self) -> float:
        t = self.config.threshold if self.config.threshold is not None else self.learnt_threshold
        if t is None:
            raise ConfigError("blob is not fitted: call fit or load a run folder (or set threshold)")
        return t

    # ------------------------------------------------------------------- residual
    def residual(self, gray: np.ndarray) -> np.ndarray:
        """Flattened residual r (H, W) float32 >= 0 of one gray image in [0, 1]."""
        c = self.config
        side = _odd(c.background_size)
        img: np.ndarray = gray.astype(np.float32)
        if c.background == "tophat":
            kernel = _ellipse(side)
            dark = cv2.morphologyEx(img, cv2.MORPH_BLACKHAT, kernel)
            bright = cv2.morphologyEx(img, cv2.MORPH_TOPHAT, kernel)
        else:
            if c.background == "median":
                # cv2.medianBlur takes 8-bit images for sides above 5; the residual is taken
                # against the same 8-bit image, so a flat image has none
                u8 = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
                img = u8.astype(np.float32) / 255
                bg: np.ndarray = cv2.medianBlur(u8, side).astype(np.float32) / 255
            else:
                bg = cv2.GaussianBlur(img, (side, side), side / 6, borderType=cv2.BORDER_REFLECT)
            dark, bright = bg - img, img - bg
        r = {"dark": dark, "bright": bright, "both": np.maximum(dark, bright)}[c.polarity]
        r = np.maximum(r, 0)
        if c.adaptive:
            w = _odd(c.adaptive_window)
            rms = np.sqrt(cv2.blur(r * r, (w, w), borderType=cv2.BORDER_REFLECT))
            r = r / (rms + c.adaptive_floor)
        return r.astype(np.float32)

    @staticmethod
    def _gray(x: torch.Tensor) -> np.ndarray:
        """(B, C, H, W) tensor -> (B, H, W) float32 array, the mean of the channels."""
        return x.detach().float().mean(dim=1).cpu().numpy()

    # ------------------------------------------------------------------------ fit
    def fit(self, batches: Iterable[Batch], progress: Progress | None = None) -> Blob:
        """Learn the threshold (unless config.threshold is set): the percentile of the
        residuals of every good image's pixels.

        Each image keeps only its highest residuals (FIT_SHARE times its share of the
        pixels above the percentile, plus FIT_EXTRA), so memory stays small. The result is
        exact when the percentile falls at or above every image's highest dropped value,
        which fit_report["threshold_exact"] records; otherwise it is a lower bound (one
        image holding far more than its share of the highest residuals)."""
        kept: list[np.ndarray] = []
        cut = -np.inf  # the highest residual any image dropped
        total = images = 0
        channels = None
        tail = 1 - self.config.threshold_percentile / 100
        for batch in tracked(batches, progress, "blob: fitting"):
            x = images_of(batch)
            if isinstance(batch, Batch):
                x = x[batch.label == 0]  # learns from good images only
            if x.numel() == 0:
                continue
            channels = int(x.shape[1])
            for gray in self._gray(x):
                r = self.residual(gray).ravel()
                total += r.size
                images += 1
                k = min(r.size, math.ceil(r.size * tail * FIT_SHARE) + FIT_EXTRA)
                if k < r.size:
                    part = np.partition(r, r.size - k)
                    cut = max(cut, float(part[: r.size - k].max()))
                    r = part[r.size - k:]
                kept.append(r.copy())
        if images == 0:
            raise ConfigError("blob: no good images to fit on")
        if self.config.channels is None:
            self.config.channels = channels
        pool = np.concatenate(kept)
        k = _pixel_count_for(total, self.config.threshold_percentile)
        value = float(np.partition(pool, pool.size - k)[pool.size - k])
        learnt = value * self.config.threshold_margin
        if not math.isfinite(learnt) or learnt <= 0:
            raise ConfigError(
                f"blob: the good images' residual at the {self.config.threshold_percentile} "
                f"percentile is {learnt}: the images are flat after background flattening; "
                f"set threshold=VALUE, a lower threshold_percentile or a larger background_size")
        self.learnt_threshold = learnt
        self.fit_report = {"images_fitted": images, "learnt_threshold": learnt,
                           "threshold_exact": bool(value >= cut),
                           "threshold_used": self.threshold_value}
        self.fitted = True
        return self

    # -------------------------------------------------------------------- predict
    def blobs(self, r: np.ndarray) -> tuple[np.ndarray, list[dict[str, float]]]:
        """The surviving blobs of one residual: their mask (H, W) bool and, per blob, area,
        contrast, circularity and elongation."""
        c, t = self.config, self.threshold_value
        binary: np.ndarray = (r >= t).astype(np.uint8)
        if c.open_size:
            binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, _ellipse(c.open_size))
        if c.close_size:
            binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, _ellipse(c.close_size))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        keep = np.zeros(n, bool)
        found: list[dict[str, float]] = []
        for i in range(1, n):
            area = int(stats[i, cv2.CC_STAT_AREA])
            if area < c.min_area or (c.max_area is not None and area > c.max_area):
                continue
            x0, y0, w, h = (int(stats[i, k]) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP,
                                                       cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
            own = labels[y0:y0 + h, x0:x0 + w] == i
            contrast = float(r[y0:y0 + h, x0:x0 + w][own].mean()) / t
            if contrast < c.min_contrast:
                continue
            shape = _shape(own)
            if shape["circularity"] < c.min_circularity:
                continue
            if c.max_elongation is not None and shape["elongation"] > c.max_elongation:
                continue
            keep[i] = True
            found.append({"area": area, "contrast": contrast, **shape,
                          "x": x0, "y": y0, "width": w, "height": h})
        return keep[labels], found

    def predict(self, images: torch.Tensor | Batch) -> Prediction:
        if not self.fitted:
            raise ConfigError("blob is not fitted: call fit or load a run folder")
        x = images_of(images)
        want = (self.config.channels, *self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ConfigError(f"blob expects images (B, {', '.join(map(str, want))}), "
                              f"got {tuple(x.shape)}")
        t = self.threshold_value
        scores, maps, counts = [], [], []
        for gray in self._gray(x):
            raw = self.residual(gray)
            mask, found = self.blobs(raw)
            r = raw / t
            amap = np.where(mask, 1 + r, r / (1 + r))
            if found:
                score = 1 + max(b["contrast"] * math.sqrt(b["area"]) for b in found)
            else:
                q = float(r.max())
                score = q / (1 + q)
            scores.append(score)
            maps.append(amap)
            counts.append(len(found))
        return Prediction(score=torch.tensor(scores, dtype=torch.float32),
                          anomaly_map=torch.from_numpy(np.stack(maps)).float().unsqueeze(1),
                          extras={"n_blobs": torch.tensor(counts, dtype=torch.float32)})

    # -------------------------------------------------------------------- weights
    def state_tensors(self) -> dict[str, torch.Tensor]:
        # NaN only for a model never fitted but given a fixed threshold (save refuses an
        # unfitted model; a Python user may set learnt_threshold = None with threshold set)
        value = float("nan") if self.learnt_threshold is None else self.learnt_threshold
        return {"learnt_threshold": torch.tensor([value], dtype=torch.float64)}

    def check_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        t = tensors.get("learnt_threshold")
        if t is None or t.shape != (1,):
            raise ValueError("blob weights need learnt_threshold, one number")

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.check_state_tensors(tensors)
        value = float(tensors["learnt_threshold"][0])
        if math.isnan(value):
            if self.config.threshold is None:
                raise ValueError("blob weights hold no learnt threshold and the config sets none")
            self.learnt_threshold = None
        elif not math.isfinite(value) or value <= 0:
            raise ValueError(f"blob learnt_threshold {value} is not a positive number")
        else:
            self.learnt_threshold = value
        self.fitted = True


def _shape(own: np.ndarray) -> dict[str, float]:
    """Circularity 4 pi A / P^2 (capped at 1: on a pixel grid tiny blobs overshoot) and
    elongation (sqrt of the ratio of the second-moment eigenvalues, 1 for a disc) of one
    blob's boolean mask."""
    u8 = np.pad(own.astype(np.uint8), 1)
    area = float(own.sum())
    contours, _ = cv2.findContours(u8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    perimeter = max(sum(cv2.arcLength(cnt, True) for cnt in contours), 1.0)
    circularity = min(4 * math.pi * area / perimeter**2, 1.0)
    m = cv2.moments(u8, binaryImage=True)
    if m["m00"] <= 0:
        return {"circularity": circularity, "elongation": 1.0}
    mu20, mu02, mu11 = (m[k] / m["m00"] for k in ("mu20", "mu02", "mu11"))
    common = math.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    big, small = (mu20 + mu02) / 2 + common, (mu20 + mu02) / 2 - common
    # a one-pixel-wide line has small = 0: its elongation is bounded by its length
    small = max(small, 1 / 12)  # the second moment of one pixel's width
    return {"circularity": circularity, "elongation": math.sqrt(big / small)}


__all__ = ["Blob", "BlobConfig"]
