"""Synthetic test kits for the line: good and defective strips, each acquired n_runs times.

In the spirit of the thesis's test kit (141 defective and 120 good products, each acquired 10
times, 16 frames an acquisition; ch. 10.5.4). The folder layout is the one `line.kit.read_kit`
reads, so a user's own kit, arranged the same way, goes through the same validation:

    KIT/
      layout.yaml                                  the product layout (anomalyqc.line.layout)
      roi/<region>.png                             ROI mask of each region (layout.yaml names them)
      ground_truth.json                            labels per strip, run, vial and region
      strips/<strip_id>/run_<k>/frame_<i>.png      8-bit grayscale frames; k, i count from 1
      masks/<strip_id>/run_<k>/frame_<i>.png       optional defect masks (0 / 255)

Strip ids are neutral (`strip_000`, ...) and shuffled, so a file name does not give the label
away. ground_truth.json is written last: a folder without it is not a complete kit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from anomalyqc import __version__
from anomalyqc.errors import ConfigError
from anomalyqc.fileio import atomic_write_json, atomic_write_png, prepare_generated_folder
from anomalyqc.line.kit import GROUND_TRUTH, KIT_FORMAT, KIT_FORMAT_VERSION, LAYOUT_FILE, frame_name, run_name
from anomalyqc.line.layout import ProductLayout, default_layout, load_layout, write_layout
from anomalyqc.line.patches import region_labels
from anomalyqc.progress import Progress, tracked
from anomalyqc.synth.acquisition import AcquisitionConfig, acquire, make_strip
from anomalyqc.synth.vials import VialStripConfig, pose_roi

GENERATOR = "anomalyqc.synth.kit"
GENERATOR_VERSION = 1
ROI_DIR = "roi"
_ENTRIES = ("strips", "masks", ROI_DIR, LAYOUT_FILE, GROUND_TRUTH)


def _is_previous_kit(out: Path) -> bool:
    try:
        gen = json.loads((out / GROUND_TRUTH).read_text()).get("generator", {}).get("name")
    except (OSError, ValueError, AttributeError):
        return False
    return bool(gen == GENERATOR)


def _prepare(out: Path) -> None:
    """Refuse a foreign non-empty folder; clear a previous generated kit."""
    prepare_generated_folder(out, _ENTRIES, out.is_dir() and _is_previous_kit(out),
                             f"a kit written by {GENERATOR}")


def kit_plan(
    n_good: int, n_defect: int, defect_types: tuple[str, ...], seed: int
) -> list[tuple[str, int, str]]:
    """(strip_id, index within its kind, kind) of every strip; kinds spread evenly, ids shuffled."""
    jobs: list[tuple[str, int]] = [("good", i) for i in range(n_good)]
    k = len(defect_types)
    counts = [n_defect // k + (j < n_defect % k) for j in range(k)]
    jobs += [(t, i) for t, c in zip(defect_types, counts) for i in range(c)]
    order = np.random.default_rng(np.random.SeedSequence([seed, 3])).permutation(len(jobs))
    digits = max(3, len(str(len(jobs) - 1)))
    return [(f"strip_{n:0{digits}d}", jobs[j][1], jobs[j][0]) for n, j in enumerate(order)]


def region_rois(layout: ProductLayout, cfg: VialStripConfig) -> dict[str, np.ndarray]:
    """The ROI of each region of the generator's layout, at the region's box size (uint8 0/1):
    the generator's ROI (plastic grown by roi_margin, as `synth vials` writes it) over every
    pose it draws (vials.pose_roi), merged over the vials, since all vials share a region's mask."""
    strip = pose_roi(cfg)
    out: dict[str, np.ndarray] = {}
    boxes = layout.boxes()
    for j, name in enumerate(layout.region_names):
        x0, y0, x1, y1 = (int(c) for c in boxes[0, j])
        m = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for v in range(layout.n_vials):
            a0, b0, a1, b1 = (int(c) for c in boxes[v, j])
            m |= strip[b0:b1, a0:a1]
        out[name] = m
    return out


def write_synthetic_layout(
    path: str | Path, cfg: VialStripConfig, patch_size: int = 256, rois: str | None = ROI_DIR
) -> ProductLayout:
    """Write the generator's layout to `path` and, unless `rois` is None, each region's ROI
    mask to `<folder of path>/<rois>/<region>.png` (named in the layout); return it as loaded."""
    path = Path(path)
    layout = default_layout(cfg, patch_size)
    if rois is not None:
        for j, (name, m) in enumerate(region_rois(layout, cfg).items()):
            rel = f"{rois}/{name}.png"
            atomic_write_png(path.parent / rel, m * 255)
            layout.regions[j].roi = rel
    write_layout(layout, path)
    return load_layout(path)


def _strip_rng(seed: int, kind: str, index: int) -> np.random.Generator:
    """Independent stream per strip: the counts of other kinds never change a strip."""
    code = sum(ord(c) * 31**i for i, c in enumerate(kind)) % (2**31)
    return np.random.default_rng(np.random.SeedSequence([seed, 2, code, index]))


def generate_kit(
    out_dir: str | Path,
    seed: int = 0,
    n_good: int = 120,
    n_defect: int = 141,
    n_runs: int = 10,
    cfg: AcquisitionConfig | None = None,
    patch_size: int = 256,
    write_masks: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write a test kit (see module doc) and return a summary. Same arguments, same bytes."""
    cfg = cfg or AcquisitionConfig()
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if n_good < 0 or n_defect < 0 or n_good + n_defect == 0:
        raise ConfigError("a kit needs n_good >= 0 and n_defect >= 0 strips, not both 0")
    if n_runs < 1:
        raise ConfigError(f"n_runs must be >= 1, got {n_runs}")
    out = Path(out_dir)
    _prepare(out)
    layout = write_synthetic_layout(out / LAYOUT_FILE, cfg.strip, patch_size)
    strips: dict[str, Any] = {}
    plan = kit_plan(n_good, n_defect, cfg.defect_types, int(seed))
    for strip_id, index, kind in tracked(plan, progress, "Generating the test kit"):
        strip = make_strip(_strip_rng(int(seed), kind, index), cfg, None if kind == "good" else kind)
        runs: dict[str, Any] = {}
        union = np.zeros((layout.n_vials, layout.n_regions), bool)
        for k in range(1, n_runs + 1):
            acq = acquire(strip, k, cfg)
            folder = out / "strips" / strip_id / run_name(k)
            for i, frame in enumerate(acq.frames, start=1):
                # not fsynced: the kit is regenerated byte for byte, ground_truth.json marks it whole
                atomic_write_png(folder / frame_name(i), frame, durable=False)
                if write_masks and strip.label:
                    atomic_write_png(out / "masks" / strip_id / run_name(k) / frame_name(i),
                                     acq.masks[i - 1] * 255, durable=False)  # fmt: skip
            regions = region_labels(acq.masks, layout).any(axis=0)
            union |= regions
            runs[str(k)] = {"regions": regions.astype(int).tolist()}
        strips[strip_id] = {
            "label": strip.label,
            "defect_types": strip.defect_types,
            "defects": [d.describe() for d in strip.defects],
            "regions": union.astype(int).tolist(),
            "runs": runs,
        }
    gt = {
        "format": KIT_FORMAT,
        "format_version": KIT_FORMAT_VERSION,
        "positive_class": "defective (label 1); good is label 0",
        "n_frames": cfg.n_frames,
        "n_runs": n_runs,
        "region_names": layout.region_names,
        "n_vials": layout.n_vials,
        "pixel_size_um": round(cfg.pixel_size_um, 3),
        "generator": {
            "name": GENERATOR,
            "version": GENERATOR_VERSION,
            "anomalyqc_version": __version__,
            "seed": int(seed),
            "n_good": n_good,
            "n_defect": n_defect,
            "config": _config_dict(cfg),
        },  # fmt: skip
        "strips": strips,
    }
    atomic_write_json(out / GROUND_TRUTH, gt)
    return {
        "out_dir": str(out),
        "n_strips": len(plan),
        "n_good": n_good,
        "n_defect": n_defect,
        "n_runs": n_runs,
        "n_frames": cfg.n_frames,
        "n_images": len(plan) * n_runs * cfg.n_frames,
    }


def _config_dict(cfg: AcquisitionConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)
