"""Read a line test kit: strips, their runs of frames, and labels per strip, run, vial and region.

Folder layout (the generator `anomalyqc.synth.kit` writes it; arrange your own kit the same way):

    KIT/
      layout.yaml                                  product layout (anomalyqc.line.layout)
      roi/<region>.png                             optional ROI masks, named by layout.yaml
      ground_truth.json                            labels (below)
      strips/<strip_id>/run_<k>/frame_<i>.png      8-bit grayscale, layout's image size;
                                                   k = 1..n_runs, i = 1..F (any zero padding)
      masks/<strip_id>/run_<k>/frame_<i>.png       optional pixel masks, nonzero = defect

ground_truth.json:

    {"format": "anomalyqc-line-kit", "format_version": 1,
     "strips": {
       "<strip_id>": {"label": 0 | 1,                    # 1 = defective (the positive class)
                      "defect_types": ["scratch"],       # optional
                      "regions": [[0, 1, 0, 0], ...],    # optional, n_vials x n_regions, 0/1
                      "runs": {"<k>": {"regions": [[...]]}}}}}   # optional, per run

Region labels of a run are its own entry, else the strip's `regions`, else unknown (None) for
a defective strip; a good strip's regions are all 0. Every strip folder must be listed and
every listed strip must have a folder; every run of the kit must have the same number of
frames. Errors name the file at fault and the fix.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomalyqc.errors import DataError
from anomalyqc.line.layout import ProductLayout, load_layout
from anomalyqc.types import DEFECT, GOOD

KIT_FORMAT = "anomalyqc-line-kit"
KIT_FORMAT_VERSION = 1
LAYOUT_FILE = "layout.yaml"
GROUND_TRUTH = "ground_truth.json"
_RUN = re.compile(r"run_(\d+)")
_FRAME = re.compile(r"frame_(\d+)\.png")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_name(k: int) -> str:
    return f"run_{k:02d}"


def frame_name(i: int) -> str:
    return f"frame_{i:02d}.png"


@dataclass
class RunRecord:
    """One acquisition of a strip: its frame files (in order) and what is known of its labels."""

    strip_id: str
    run: int  # 1-based
    frames: list[Path]
    masks: list[Path | None]
    regions: np.ndarray | None  # (n_vials, n_regions) uint8, None = unknown

    @property
    def vials(self) -> np.ndarray | None:
        """Vial labels: a vial is defective if any of its regions is."""
        return None if self.regions is None else self.regions.max(axis=1)

    def load_frames(self) -> np.ndarray:
        """(F, H, W) uint8."""
        return np.stack([_read_gray(p) for p in self.frames])

    def load_masks(self) -> np.ndarray:
        """(F, H, W) uint8 0/1; a frame without a mask file has an empty mask."""
        first = _read_gray(self.frames[0])
        return np.stack([
            (_read_gray(m) > 0).astype(np.uint8) if m is not None else np.zeros_like(first)
            for m in self.masks
        ])  # fmt: skip


@dataclass
class StripRecord:
    strip_id: str
    label: int  # 1 = defective
    defect_types: list[str]
    runs: list[RunRecord]
    info: dict[str, Any] = field(default_factory=dict)  # the strip's ground-truth entry


@dataclass
class Kit:
    root: Path
    layout: ProductLayout
    strips: list[StripRecord]
    n_frames: int
    ground_truth: dict[str, Any]

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.strips], np.int64)


def _read_gray(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise DataError(f"{path}: cannot read the image; write it as an 8-bit grayscale PNG")
    return img


def _png_size(path: Path) -> tuple[int, int]:
    """(height, width) from the PNG header, without decoding the image."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DataError(f"{path}: not a PNG file; kit frames must be PNG")
    w, h = struct.unpack(">II", head[16:24])
    return int(h), int(w)


def _numbered(folder: Path, pattern: re.Pattern[str], what: str) -> list[tuple[int, Path]]:
    """Entries of `folder` matching `pattern`, sorted by number; anything else is an error."""
    out = []
    for p in folder.iterdir():
        if p.name.startswith("."):
            continue
        m = pattern.fullmatch(p.name)
        if m is None:
            raise DataError(f"{p}: unexpected entry; a {what} is named like {pattern.pattern!r}")
        out.append((int(m.group(1)), p))
    out.sort()
    nums = [n for n, _ in out]
    if nums != list(range(1, len(nums) + 1)):
        raise DataError(f"{folder}: {what}s are numbered {nums}; number them 1, 2, ... without gaps")
    return out


def _regions(value: Any, layout: ProductLayout, where: str) -> np.ndarray:
    a = np.asarray(value)
    if a.shape != (layout.n_vials, layout.n_regions) or not np.isin(a, (0, 1)).all():
        raise DataError(
            f"{where}: regions must be {layout.n_vials} lists (vials) of {layout.n_regions} "
            "labels (regions), each 0 or 1"
        )
    return a.astype(np.uint8)


def _load_ground_truth(path: Path) -> dict[str, Any]:
    try:
        gt = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing; write the kit's labels there (see anomalyqc.line.kit)") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err}); fix or regenerate it") from None
    if not isinstance(gt, dict) or gt.get("format") != KIT_FORMAT:
        raise DataError(f'{path}: "format" must be {KIT_FORMAT!r}')
    if gt.get("format_version") != KIT_FORMAT_VERSION:
        raise DataError(f"{path}: format_version {gt.get('format_version')!r} is not supported "
                        f"(expected {KIT_FORMAT_VERSION})")  # fmt: skip
    if not isinstance(gt.get("strips"), dict) or not gt["strips"]:
        raise DataError(f'{path}: "strips" must map each strip id to its labels')
    return gt


def _common_frame_count(strips: list[StripRecord]) -> int:
    """The kit's frames per acquisition (the most common count); a run that differs is an error."""
    counts = [len(r.frames) for s in strips for r in s.runs]
    n = max(set(counts), key=counts.count)
    for s in strips:
        for r in s.runs:
            if len(r.frames) != n:
                raise DataError(
                    f"{r.frames[0].parent}: {len(r.frames)} frames, but the kit's other runs have {n}; "
                    "every acquisition must have the same number of frames"
                )
    return n


def read_kit(root: str | Path, check_images: bool = True) -> Kit:
    """Validate a kit folder and list its strips and runs (frames are read later, per run).

    `check_images` reads every frame's PNG header (24 bytes) to check its size against the layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: kit folder not found; give the folder holding layout.yaml and strips/")
    if not (root / LAYOUT_FILE).is_file():
        raise DataError(
            f"{root / LAYOUT_FILE}: missing; write the product layout there (see anomalyqc.line.layout)"
        )
    layout = load_layout(root / LAYOUT_FILE)
    gt_path = root / GROUND_TRUTH
    gt = _load_ground_truth(gt_path)
    strips_dir = root / "strips"
    if not strips_dir.is_dir():
        raise DataError(f"{strips_dir}: missing; put each strip's runs in strips/<strip_id>/run_<k>/")
    folders = {p.name: p for p in strips_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    listed = gt["strips"]
    if missing := sorted(set(listed) - set(folders)):
        raise DataError(
            f"{strips_dir}: no folder for strip {missing[0]!r} listed in {gt_path.name}; "
            "add it or remove the entry"
        )
    if extra := sorted(set(folders) - set(listed)):
        raise DataError(f"{folders[extra[0]]}: strip not listed in {gt_path}; add its labels there")
    records = []
    for sid in sorted(listed):
        info = listed[sid]
        where = f"{gt_path}: strips.{sid}"
        if not isinstance(info, dict) or info.get("label") not in (GOOD, DEFECT):
            raise DataError(f"{where}: label must be 0 (good) or 1 (defective)")
        label = int(info["label"])
        strip_regions = _regions(info["regions"], layout, where) if "regions" in info else None
        if label == GOOD and strip_regions is not None and strip_regions.any():
            raise DataError(
                f"{where}: a good strip (label 0) cannot have defective regions; fix its label or regions"
            )
        if label == DEFECT and strip_regions is not None and not strip_regions.any():
            raise DataError(f"{where}: a defective strip (label 1) needs at least one defective region")
        run_info = info.get("runs", {})
        if not isinstance(run_info, dict):
            raise DataError(f'{where}.runs: must map run numbers to {{"regions": ...}}')
        runs = []
        for k, run_dir in _numbered(folders[sid], _RUN, "run folder"):
            frames = [p for _, p in _numbered(run_dir, _FRAME, "frame")]
            if not frames:
                raise DataError(f"{run_dir}: no frames; add frame_1.png, frame_2.png, ...")
            if check_images:
                for p in frames:
                    if (hw := _png_size(p)) != layout.image_size:
                        raise DataError(
                            f"{p}: image is {hw[0]}x{hw[1]} but {LAYOUT_FILE} says "
                            f"{layout.image_height}x{layout.image_width} (height x width); "
                            "replace the frame or fix the layout"
                        )
            mask_dir = root / "masks" / sid / run_dir.name
            masks: list[Path | None] = [
                (mask_dir / p.name) if (mask_dir / p.name).is_file() else None for p in frames
            ]
            regions: np.ndarray | None
            if str(k) in run_info:
                regions = _regions(run_info[str(k)].get("regions"), layout, f"{where}.runs.{k}")
            elif label == GOOD:
                regions = np.zeros((layout.n_vials, layout.n_regions), np.uint8)
            else:
                regions = strip_regions
            if label == GOOD and regions is not None and regions.any():
                raise DataError(
                    f"{where}.runs.{k}: a good strip (label 0) cannot have defective regions; "
                    "fix its label or regions"
                )
            runs.append(RunRecord(sid, k, frames, masks, regions))
        if not runs:
            raise DataError(f"{folders[sid]}: no runs; put each acquisition in run_1/, run_2/, ...")
        if unknown := sorted(set(run_info) - {str(r.run) for r in runs}):
            raise DataError(
                f"{where}.runs: run {unknown[0]} has no folder in {folders[sid]}; add it or remove the entry"
            )
        records.append(StripRecord(sid, label, list(info.get("defect_types", [])), runs, info))
    n_frames = _common_frame_count(records)
    return Kit(root=root, layout=layout, strips=records, n_frames=n_frames, ground_truth=gt)
