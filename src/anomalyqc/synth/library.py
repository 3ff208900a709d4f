"""A labelled defect library from the vial generator, for the supervised detectors.

Thesis chapter 7 (table 7.1) trains its classifier on a client's library of good vials and
two defect classes, imbalanced 100 / 27 / 36. This module writes such a library from the
line generator (synth.acquisition), in the MVTec AD layout the supervised fit reads:

    OUT/train/good/*.png            OUT/test/good/*.png
    OUT/train/<class>/*.png         OUT/test/<class>/*.png
    OUT/ground_truth/<class>/<stem>_mask.png     (stems unique across the splits)
    OUT/meta.json                   (what every image holds: line defect types, window)

Each image is one frame of a one-vial strip (default 512 px tall, 128 px pitch: the line
kit's 156 um/px), cut to a square window across the whole vial width: a window placed at
random for a good vial, placed at random among those that hold the whole defect for a
defective one (so the defect is anywhere in the window, not always at its centre).

Classes and the line defect types drawn for them (`CLASS_KINDS`, documented in README):

    glass          the container wall: scratch, engraving_scratch (across the mould
                   engraving), black_spot (a dark inclusion in the plastic)
    particle_cake  the product: particle (free in the liquid), stuck_particle (on the
                   inner wall, seen through the plastic)
    foam           a crowd of small bubbles on the liquid surface: the "unseen" class, a
                   defect no client library labelled; `holdout` puts a class in test/ only

Every defect image shows its defect: a labelled library holds what an inspector saw and
labelled, while the line generator also draws defects where the frame is too dark or flat
to show them (the dark top of the strip, a spot on a matching background). A defect is kept
when its pixels differ from the surrounding ring's median gray level by `min_contrast` on
average (`defect_contrast`); otherwise it is drawn again.

A class's images cycle through its kinds (image i draws kind i mod len(kinds)). Every image
is a pure function of (seed, split, class, index), so counts of one class or split never
change another's images, and the same arguments give byte-identical files.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from anomalyqc import __version__
from anomalyqc.errors import ConfigError
from anomalyqc.fileio import atomic_write_json, atomic_write_png, prepare_generated_folder
from anomalyqc.progress import Progress, tracked
from anomalyqc.synth.acquisition import ALL_DEFECT_TYPES, AcquisitionConfig, acquire, make_strip
from anomalyqc.synth.vials import VialStripConfig, written_by

GENERATOR = "anomalyqc.synth.library"
GENERATOR_VERSION = 2  # 2: invisible defects are drawn again (min_contrast)
GOOD_CLASS = "good"
CLASS_KINDS: dict[str, tuple[str, ...]] = {
    "glass": ("scratch", "engraving_scratch", "black_spot"),
    "particle_cake": ("particle", "stuck_particle"),
    "foam": ("foam",),
}
UNSEEN_CLASS = "foam"
# Thesis table 7.1 per split (100 good, 27 glass, 36 particle/cake) and the unseen class.
DEFAULT_COUNTS: dict[str, int] = {"good": 100, "glass": 27, "particle_cake": 36, "foam": 30}
_OUTPUT_ENTRIES = ("train", "test", "ground_truth", "meta.json")
_SPLITS = ("train", "test")


@dataclass
class LibraryConfig:
    """What the library holds. `counts` is per split (class -> images); a class in
    `holdout` is written to test/ only. `defect` overrides AcquisitionConfig's defect
    parameters (sizes, contrasts: e.g. particle_size_um=(1500, 2500) for large particles)."""

    counts: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_COUNTS))
    classes: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(CLASS_KINDS))
    holdout: tuple[str, ...] = ()
    patch_size: int = 128  # square window side, px (also the written image size)
    strip_height: int = 512  # the vial's height, px; its pitch (the window width) is a quarter
    defect: dict[str, Any] = field(default_factory=dict)
    # mean |defect pixel - ring median|, gray levels of 255; 0 keeps every drawn defect
    min_contrast: float = 12.0

    def __post_init__(self) -> None:
        known = set(self.classes) | {GOOD_CLASS}
        unknown = sorted(set(self.counts) - known)
        if unknown:
            raise ConfigError(f"LibraryConfig: unknown class(es) {unknown} in counts; known: "
                              f"{sorted(known)} (add a class with its line defect types to classes)")
        for cls, kinds in self.classes.items():
            bad = sorted(set(kinds) - set(ALL_DEFECT_TYPES))
            if cls == GOOD_CLASS or not kinds or bad:
                raise ConfigError(f"LibraryConfig: class {cls!r} must be named other than "
                                  f"'good' and draw a non-empty set of {ALL_DEFECT_TYPES}"
                                  + (f" (unknown: {bad})" if bad else ""))
        if any(not isinstance(n, int) or n < 0 for n in self.counts.values()):
            raise ConfigError(f"LibraryConfig: counts must be non-negative integers, got {self.counts}")
        missing = sorted(set(self.holdout) - set(self.classes))
        if missing:
            raise ConfigError(f"LibraryConfig: holdout class(es) {missing} are not among the "
                              f"defect classes {sorted(self.classes)}")
        if self.counts.get(GOOD_CLASS, 0) < 1:
            raise ConfigError("LibraryConfig: the library needs good images (counts['good'] >= 1)")
        if self.strip_height < 128 or self.strip_height % 4:
            raise ConfigError(f"LibraryConfig: strip_height must be a multiple of 4 and >= 128, "
                              f"got {self.strip_height}")
        if not 0 <= self.min_contrast < 255:
            raise ConfigError(f"LibraryConfig: min_contrast must be in [0, 255), got {self.min_contrast}")
        if not 16 <= self.patch_size <= self.strip_height:
            raise ConfigError(f"LibraryConfig: patch_size must be in [16, strip_height], got "
                              f"{self.patch_size}")

    def acquisition(self) -> AcquisitionConfig:
        strip = VialStripConfig(n_vials=1, height=self.strip_height,
                                vial_pitch=self.strip_height // 4)
        kinds = tuple(sorted({k for ks in self.classes.values() for k in ks}))
        try:
            return replace(AcquisitionConfig(strip=strip, n_frames=1, defect_types=kinds),
                           **self.defect)
        except TypeError as exc:
            raise ConfigError(f"LibraryConfig.defect: {exc}; keys are AcquisitionConfig's "
                              f"defect parameters (particle_size_um, scratch_contrast, ...)") from None


def _class_code(name: str) -> int:
    return zlib.crc32(name.encode())


def _rng(seed: int, split: str, cls: str, index: int) -> np.random.Generator:
    return np.random.default_rng(
        np.random.SeedSequence([seed, _SPLITS.index(split), _class_code(cls), index]))


def _window(rng: np.random.Generator, mask: np.ndarray, side: int) -> int:
    """Top row of a side x W window: at random, holding the whole mask when it fits."""
    h = mask.shape[0]
    rows = np.nonzero(mask.any(axis=1))[0]
    if rows.size == 0:
        return int(rng.integers(0, h - side + 1))
    y0, y1 = int(rows.min()), int(rows.max()) + 1
    if y1 - y0 > side:  # taller than the window: centred on it
        return int(np.clip((y0 + y1) // 2 - side // 2, 0, h - side))
    lo, hi = max(0, y1 - side), min(y0, h - side)
    return int(rng.integers(lo, hi + 1))


def defect_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """How visible a defect is: the mean absolute difference between its pixels and the
    median of a ring 2-4 px around it (gray levels); 0 for an empty mask."""
    import cv2

    m = (mask > 0).astype(np.uint8)
    if not m.any():
        return 0.0
    near = cv2.dilate(m, np.ones((3, 3), np.uint8)) > 0
    ring = (cv2.dilate(m, np.ones((9, 9), np.uint8)) > 0) & ~near
    if not ring.any():  # the defect fills the window: nothing to compare it with
        return float("inf")
    level = float(np.median(image[ring]))
    return float(np.abs(image[m > 0].astype(np.float64) - level).mean())


def render_item(seed: int, split: str, cls: str, index: int, config: LibraryConfig,
                acq: AcquisitionConfig | None = None) -> dict[str, Any]:
    """One library image: {"image", "mask" (uint8 0/1, side x side), "kind", "defects",
    "window_y"}. A pure function of its arguments."""
    import cv2

    acq = acq or config.acquisition()
    rng = _rng(seed, split, cls, index)
    kind = None if cls == GOOD_CLASS else config.classes[cls][index % len(config.classes[cls])]
    # A defect drawn visible on the generator's reference pose can vanish in this frame
    # (under a bubble, off the lit band): drawn again from the same stream, so still a
    # pure function of the arguments.
    for _ in range(20):
        strip = make_strip(rng, acq, kind)
        shot = acquire(strip, 0, acq)
        frame, mask = shot.frames[0], shot.masks[0]
        width = frame.shape[1]
        y = _window(rng, mask, width)
        image, m = frame[y:y + width], mask[y:y + width]
        side = config.patch_size
        if side != width:
            image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
            m = (cv2.resize(m.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)
                 > 0.01).astype(np.uint8)
        if kind is None or (m.any() and defect_contrast(image, m) >= config.min_contrast):
            break
    else:
        raise RuntimeError(f"{split}/{cls} #{index}: no {kind} with a contrast of at least "
                           f"{config.min_contrast} gray levels in 20 draws; raise its size or "
                           f"contrast (LibraryConfig.defect) or lower min_contrast")
    return {"image": image, "mask": m, "kind": kind or GOOD_CLASS,
            "defects": [d.describe() for d in strip.defects], "window_y": y}


def generate_library(out_dir: str | Path, seed: int = 0, config: LibraryConfig | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Write the library (module docstring) to `out_dir`; returns a summary with counts."""
    config = config or LibraryConfig()
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out_dir)
    prepare_generated_folder(out, _OUTPUT_ENTRIES, out.is_dir() and written_by(out, GENERATOR),
                             "a previous defect library (no meta.json from anomalyqc.synth.library)")
    acq = config.acquisition()
    jobs = [(split, cls, i) for split in _SPLITS for cls, n in config.counts.items()
            if not (split == "train" and cls in config.holdout) for i in range(n)]
    digits = max(3, len(str(max(config.counts.values()) - 1)))
    images: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for split, cls, i in tracked(jobs, progress, "Generating the defect library"):
        item = render_item(int(seed), split, cls, i, config, acq)
        stem = f"{split}_{cls}_{i:0{digits}d}"
        rel = f"{split}/{cls}/{stem}.png"
        # Not fsynced: regenerated byte for byte from the seed; meta.json, written last and
        # durably, marks a complete library.
        atomic_write_png(out / rel, item["image"], durable=False)
        if cls != GOOD_CLASS:
            atomic_write_png(out / "ground_truth" / cls / f"{stem}_mask.png", item["mask"] * 255,
                             durable=False)
        images[rel] = {"class": cls, "kind": item["kind"], "defects": item["defects"],
                       "window_y": item["window_y"]}
        counts[f"{split}/{cls}"] = counts.get(f"{split}/{cls}", 0) + 1
    counts = dict(sorted(counts.items()))
    meta = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "anomalyqc_version": __version__,
        "seed": int(seed),
        "classes": {k: list(v) for k, v in config.classes.items()},
        "holdout": list(config.holdout),
        "counts_per_split": dict(config.counts),
        "image_size": [config.patch_size] * 2,
        "strip_height": config.strip_height,
        "defect_parameters": dict(config.defect),
        "min_contrast": config.min_contrast,
        "counts": counts,
        "images": images,
    }
    atomic_write_json(out / "meta.json", meta)
    return {"out_dir": str(out), "counts": counts, "n_images": sum(counts.values()),
            "holdout": list(config.holdout)}


__all__ = ["CLASS_KINDS", "DEFAULT_COUNTS", "UNSEEN_CLASS", "LibraryConfig", "defect_contrast",
           "generate_library",
           "render_item"]
