"""A small zipper-like dataset for GRD-Net's ROI experiment (thesis 8.2.2.4.1, fig. 8.7):
defects both inside the region of interest and outside it.

Each gray image is woven fabric with a vertical zipper band across it (teeth: alternating
bright and dark bars), the band's position jittered per image. The ROI is the band. Test
images hold a defect blob (dark or bright, with some grain) inside the band, outside it (in
the fabric, some at the band's edge) or one of each:

    ROOT/train/good/NNN.png                 good images (ROIs in ROOT/roi/train/good/)
    ROOT/test/good/NNN.png                  good images
    ROOT/test/good/outside_NNN.png          a defect in the fabric only: good for the
                                            product, since only the zipper is inspected
    ROOT/test/inside/NNN.png                a defect in the zipper (mask in ground_truth/)
    ROOT/test/both/NNN.png                  one in the zipper and one in the fabric; the
                                            mask marks the zipper one only
    ROOT/roi/<split>/<type>/<stem>_roi.png  the zipper band of every image
    ROOT/meta.json                          parameters and, per test image, its defects

The MVTec layout, so `anomalyqc fit/evaluate` read it as it is (ROIs included). The same
arguments give the same files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anomalyqc import __version__
from anomalyqc.errors import ConfigError
from anomalyqc.fileio import atomic_write_json, atomic_write_png, prepare_generated_folder

GENERATOR = "anomalyqc.synth.zipper"
_ENTRIES = ("train", "test", "ground_truth", "roi", "meta.json")
KINDS = ("good", "inside", "outside", "both")


@dataclass(frozen=True)
class ZipperConfig:
    size: int = 64  # square images
    band: float = 0.25  # zipper width as a share of the image width
    jitter: float = 0.08  # band centre drawn within +-jitter x size of the middle
    tooth: int = 0  # tooth period in px; 0: size // 8
    radius: tuple[float, float] = (0.06, 0.11)  # defect radius range, share of the size

    def check(self) -> None:
        if self.size < 16:
            raise ConfigError(f"zipper images must be at least 16 px, got {self.size}")
        if not 0.1 <= self.band <= 0.5:
            raise ConfigError(f"band must be within [0.1, 0.5] of the width, got {self.band}")


@dataclass
class ZipperSample:
    image: np.ndarray  # (H, W) float32 in [0, 1]
    roi: np.ndarray  # (H, W) uint8 0/1: the zipper band
    mask: np.ndarray  # (H, W) uint8 0/1: defects inside the ROI
    outside: np.ndarray  # (H, W) uint8 0/1: defects outside the ROI (not in the mask)


def _blob(rng: np.random.Generator, cfg: ZipperConfig, yy: np.ndarray, xx: np.ndarray,
          allowed: np.ndarray) -> np.ndarray:
    """An elliptic blob lying wholly where `allowed` is true (redrawn until it does)."""
    s = cfg.size
    for _ in range(200):
        ry, rx = rng.uniform(*cfg.radius, size=2) * s
        cy, cx = rng.uniform(ry, s - ry), rng.uniform(rx, s - rx)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        if blob.any() and allowed[blob].all():
            return blob
    raise ConfigError("could not place a defect blob: enlarge size or lower radius")


def render_zipper(rng: np.random.Generator, cfg: ZipperConfig, kind: str = "good") -> ZipperSample:
    """One image of `kind` (good, inside, outside, both)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown zipper image kind {kind!r}: use one of {', '.join(KINDS)}")
    s = cfg.size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    # fabric: a fine weave with a random phase, low-frequency shading and grain
    phase = rng.uniform(0, 2 * np.pi, size=2)
    weave = 0.04 * np.sin(2 * np.pi * xx / 4 + phase[0]) * np.sin(2 * np.pi * yy / 4 + phase[1])
    shade = 0.05 * np.sin(2 * np.pi * (xx + yy) / s + rng.uniform(0, 2 * np.pi))
    img = 0.45 + weave + shade + rng.normal(0, 0.015, (s, s))
    # zipper: a band of teeth across the image
    half = cfg.band * s / 2
    centre = s / 2 + rng.uniform(-cfg.jitter, cfg.jitter) * s
    band = np.abs(xx + 0.5 - centre) <= half
    period = cfg.tooth or max(4, s // 8)
    offset = rng.integers(0, period)
    teeth = ((yy + offset) % period) < period / 2
    zipper = np.where(teeth, 0.78, 0.28) + rng.normal(0, 0.015, (s, s))
    rail = np.abs(xx + 0.5 - centre) <= max(1.0, s / 64)
    zipper = np.where(rail, 0.55, zipper)
    img = np.where(band, zipper, img)
    roi = band.astype(np.uint8)
    mask = np.zeros((s, s), np.uint8)
    outside = np.zeros((s, s), np.uint8)
    # defects: inside wholly in the band; outside wholly in the fabric, touching a 1 px
    # margin around the band or not
    fabric = ~(np.abs(xx + 0.5 - centre) <= half + 1)
    for where in {"inside": ("in",), "outside": ("out",), "both": ("in", "out")}.get(kind, ()):
        blob = _blob(rng, cfg, yy, xx, band if where == "in" else fabric)
        level = rng.choice([0.15, 0.7]) + rng.normal(0, 0.04, (s, s))
        img = np.where(blob, level, img)
        (mask if where == "in" else outside)[blob] = 1
    return ZipperSample(np.clip(img, 0, 1).astype(np.float32), roi, mask, outside)


def _rng(seed: int, split: str, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(
        [seed, 0 if split == "train" else 1, KINDS.index(kind), index]))


def generate_zipper_dataset(out: str | Path, seed: int = 0, n_train: int = 64,
                            n_test: dict[str, int] | None = None,
                            cfg: ZipperConfig | None = None) -> dict[str, Any]:
    """Write the dataset (see the module docstring); returns meta.json's content.
    n_test: images per kind in the test split (default 16 of each)."""
    cfg = cfg or ZipperConfig()
    cfg.check()
    counts = {k: 16 for k in KINDS} | (n_test or {})
    if n_train < 1 or any(v < 0 for v in counts.values()) or set(counts) - set(KINDS):
        raise ConfigError(f"need n_train >= 1 and test counts >= 0 for {', '.join(KINDS)}")
    out = Path(out)
    ours = (out / "meta.json").is_file() and _is_ours(out)
    prepare_generated_folder(out, _ENTRIES, ours, "a zipper dataset (no meta.json from "
                                                  f"{GENERATOR})")
    images: dict[str, Any] = {}
    jobs = [("train", "good", i) for i in range(n_train)]
    jobs += [("test", k, i) for k in KINDS for i in range(counts[k])]
    for split, kind, i in jobs:
        z = render_zipper(_rng(seed, split, kind, i), cfg, kind)
        folder = "good" if kind in ("good", "outside") else kind
        stem = f"outside_{i:03d}" if kind == "outside" else f"{i:03d}"
        rel = f"{split}/{folder}/{stem}.png"
        atomic_write_png(out / rel, (z.image * 255).round().astype(np.uint8), durable=False)
        atomic_write_png(out / "roi" / split / folder / f"{stem}_roi.png", z.roi * 255,
                         durable=False)
        if folder != "good":
            atomic_write_png(out / "ground_truth" / folder / f"{stem}_mask.png", z.mask * 255,
                             durable=False)
        if split == "test":
            images[rel] = {"kind": kind, "inside_px": int(z.mask.sum()),
                           "outside_px": int(z.outside.sum())}
    meta = {"generator": GENERATOR, "version": __version__, "seed": seed, "n_train": n_train,
            "n_test": counts, "config": asdict(cfg), "test_images": images}
    atomic_write_json(out / "meta.json", meta)  # last: marks a complete dataset
    return meta


def _is_ours(out: Path) -> bool:
    try:
        return json.loads((out / "meta.json").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


__all__ = ["KINDS", "ZipperConfig", "ZipperSample", "generate_zipper_dataset", "render_zipper"]
