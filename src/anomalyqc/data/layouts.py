"""Dataset folder layouts -> lists of Records (paths and labels, no pixels).

Two layouts are understood:

MVTec AD (detected when ROOT/train/good exists)::

    ROOT/train/good/*.png                   good training images
    ROOT/test/good/*.png                    good test images
    ROOT/test/<defect>/*.png                defect images, one folder per defect type
    ROOT/ground_truth/<defect>/<stem>_mask.png   defect masks, optional (see below)
    ROOT/roi/<split>/<type>/<stem>_roi.png  optional regions of interest (our extension;
                                            indexed here, not read: see dataset.py)

  Every subfolder of a split is a type; "good" is label 0, anything else label 1.
  Masks are all or nothing: a split where no defect image has a mask (no ground_truth/
  folder) is read with image labels only, and pixel metrics are then not computed; a split
  where some defect images have masks and others not is an error naming the first image
  without one (a forgotten mask would silently drop that image from the pixel metrics).

Plain folders (detected when ROOT/good exists)::

    ROOT/good/*.png                         good images
    ROOT/<defect>/*.png                     defect images (every other subfolder, or the
                                            ones named in defect_dirs)
    ROOT/<mask_dir>/<defect>/<stem>.png     masks, only if mask_dir is given (<stem>_mask.png
                                            also accepted); required for defects when given
    ROOT/<roi_dir>/<type>/<stem>.png        optional ROIs (<stem>_roi.png also accepted),
                                            including ROOT/<roi_dir>/good/ for good images

  The folder layout has no split: train = the good images, test = every image (good ones
  included, so use the MVTec layout when you need held-out good images). A dataset with
  its own train/good folder is read with the MVTec rules.

Nothing is left out silently: every listing returns, with its records, the entries it did
not read and why (see anomalyqc.data.listing). In a type folder that is every entry that is
not a readable image (unsupported extensions, hidden files, subfolders, dangling symlinks,
symlink loops, FIFOs, folders named like images); in a split folder or the dataset root, the
image-like entries and the folders that are not part of the layout (documentation such as
readme.txt or meta.json, and hidden entries of the root, are not listed). Images directly in
a split folder are an error, as before; images loose in the dataset root are skipped.

A folder named like annotations (masks, mask, ground_truth, roi, rois, labels; any case)
where a type folder is expected is an error rather than a defect class: read as defects,
its masks would be scored as defective images. In the folder layout, pass it as mask_dir or
roi_dir (or list the real defect folders with defect_dirs); in an MVTec test/ or train/
folder, move it to ROOT/ground_truth/ (masks) or ROOT/roi/ (ROIs).

Sidecar files (masks, ROIs) may have any image extension. Mask/image size mismatches are
checked when a sample is loaded (see ImageDataset), since that needs the pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from anomalyqc.data.io import IMAGE_EXTENSIONS, is_image_file
from anomalyqc.data.listing import FolderScan, Skipped, leaf_listing, scan
from anomalyqc.errors import ConfigError, DataError
from anomalyqc.pathtext import display
from anomalyqc.types import DEFECT, GOOD

Split = Literal["train", "test"]
Layout = Literal["mvtec", "folder"]

GOOD_TYPE = "good"
MVTEC_LAYOUT = (
    "expected the MVTec AD layout: ROOT/train/good/*.png, ROOT/test/<defect>/*.png, "
    "ROOT/ground_truth/<defect>/<name>_mask.png"
)
FOLDER_LAYOUT = "expected the folder layout: ROOT/good/*.png, ROOT/<defect>/*.png"
MVTEC_ROOT_ENTRIES = ("train", "test", "ground_truth", "roi")
# Folder names that hold annotations, never a defect class (compared lower-cased).
ANNOTATION_NAMES = frozenset({"masks", "mask", "ground_truth", "roi", "rois", "labels"})
LOOSE_IN_ROOT = "image loose in the dataset root (not in a type folder)"
NESTED = "subfolder of a type folder (types are one level deep: not read)"


@dataclass
class Record:
    """Where one sample lives on disk and what we know about it before reading it."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None
    roi_path: Path | None = None


@dataclass
class Listing:
    """The records of a dataset split and the entries that were not read (with reasons)."""

    records: list[Record]
    skipped: list[Skipped]


# --------------------------------------------------------------------------- MVTec AD


def mvtec_records(root: str | Path, split: Split = "train", masks: bool = True) -> list[Record]:
    """Records of one split of an MVTec AD style dataset, sorted by type then name.

    masks=True reads the masks the split has: all defect images' or none (image labels
    only); masks for some but not all is an error. masks=False ignores masks altogether
    (image-level evaluation of a partly annotated dataset). mvtec_listing also says what
    was skipped.
    """
    return mvtec_listing(root, split, masks).records


def mvtec_listing(root: str | Path, split: Split = "train", masks: bool = True) -> Listing:
    """mvtec_records and the entries of the root, the split and its type folders not read."""
    root = _existing_root(root)
    _check_split(split)
    if split == "train" and not (root / "train" / GOOD_TYPE).is_dir():
        raise DataError(f"{root} has no train/good folder (training needs good images); "
                        f"{MVTEC_LAYOUT}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{root} has no {split}/ folder ({split_dir}); {MVTEC_LAYOUT}")
    skipped = _root_skips(scan(root), MVTEC_ROOT_ENTRIES,
                          "folder not part of the MVTec layout (train, test, ground_truth, roi)")
    split_scan = scan(split_dir)
    _reject_loose_images(split_scan, f"put them in {split_dir / GOOD_TYPE} or {split_dir}/<defect>")
    skipped += _split_skips(split_scan)
    type_dirs = split_scan.folders
    _reject_annotation_folders(type_dirs, "move it to ROOT/ground_truth/<defect>/ (masks) or "
                                          "ROOT/roi/<split>/<type>/ (ROIs)")
    records: list[Record] = []
    for type_dir in type_dirs:
        mask_folder = root / "ground_truth" / type_dir.name
        roi_folder = root / "roi" / split / type_dir.name
        found, skips = _type_records(
            type_dir,
            mask_folder if masks else None,
            ("_mask",),
            roi_folder,
            hint="add images or remove the folder",
            require_masks=False,
        )
        records += found
        skipped += skips
    if not records:
        raise DataError(f"split folder {split_dir} has no images; {MVTEC_LAYOUT}")
    _check_all_or_no_masks(records, root)
    return Listing(records, skipped)


def _check_all_or_no_masks(records: list[Record], root: Path) -> None:
    """Every defect image has a mask, or none has; name the first one without."""
    defects = [r for r in records if r.label != GOOD]
    with_mask = sum(r.mask_path is not None for r in defects)
    if 0 < with_mask < len(defects):
        first = next(r for r in defects if r.mask_path is None)
        folder = root / "ground_truth" / first.defect_type
        raise _missing_mask(first.path, folder, ("_mask",),
                            f" ({with_mask} of the {len(defects)} defect images have one)")


# ------------------------------------------------------------------------ plain folders


def folder_records(
    root: str | Path,
    good_dir: str = GOOD_TYPE,
    defect_dirs: Sequence[str] | None = None,
    mask_dir: str | None = None,
    roi_dir: str | None = None,
) -> list[Record]:
    """Records of a plain folder dataset: good images first, then each defect folder."""
    return folder_listing(root, good_dir, defect_dirs, mask_dir, roi_dir).records


def folder_listing(
    root: str | Path,
    good_dir: str = GOOD_TYPE,
    defect_dirs: Sequence[str] | None = None,
    mask_dir: str | None = None,
    roi_dir: str | None = None,
) -> Listing:
    """folder_records and the entries of the root and the type folders not read."""
    root = _existing_root(root)
    good = root / good_dir
    if not good.is_dir():
        raise DataError(f"{root} has no {good_dir}/ folder; {FOLDER_LAYOUT}")
    mask_root = _optional_subdir(root, mask_dir, "mask_dir")
    roi_root = _optional_subdir(root, roi_dir, "roi_dir")
    hint = (
        "add images or remove the folder (if it holds masks or ROIs, pass it as "
        "mask_dir / roi_dir; or list the defect folders with defect_dirs)"
    )
    root_scan = scan(root)
    defects = _defect_folders(root_scan, good_dir, defect_dirs, (mask_dir, roi_dir))
    used = {good_dir, *(n for n in (mask_dir, roi_dir) if n), *(d.name for d in defects)}
    skipped = _root_skips(root_scan, tuple(used), "folder not listed in defect_dirs")
    records: list[Record] = []
    for type_dir in [good, *defects]:
        found, skips = _type_records(
            type_dir,
            mask_root / type_dir.name if mask_root else None,
            ("", "_mask"),
            roi_root / type_dir.name if roi_root else None,
            hint=hint,
            roi_suffixes=("", "_roi"),
            good_type=good_dir,
        )
        records += found
        skipped += skips
    return Listing(records, skipped)


def _defect_folders(
    root_scan: FolderScan,
    good_dir: str,
    defect_dirs: Sequence[str] | None,
    reserved: Iterable[str | None],
) -> list[Path]:
    """The named defect folders (each must exist), or every other non-hidden subfolder;
    a folder named like annotations among those is an error (see the module docstring)."""
    root = root_scan.folder
    if defect_dirs is None:
        skip = {good_dir, *(r for r in reserved if r)}
        folders = [d for d in root_scan.folders if d.name not in skip]
        _reject_annotation_folders(folders, "pass it as mask_dir / roi_dir, or list the defect "
                                            "folders with defect_dirs")
        return folders
    folders = [root / name for name in defect_dirs]
    for folder in folders:
        if not folder.is_dir():
            raise DataError(f"defect folder {folder} does not exist; check defect_dirs")
    return folders


def _optional_subdir(root: Path, name: str | None, option: str) -> Path | None:
    if name is None:
        return None
    folder = root / name
    if not folder.is_dir():
        raise DataError(f"{option} folder {folder} does not exist; check {option}")
    return folder


# ----------------------------------------------------------------------- auto-detection


def detect_layout(root: str | Path, good_dir: str = GOOD_TYPE) -> Layout:
    """'mvtec' when ROOT/train/good exists (or only ROOT/test: a validation set with no
    training images), 'folder' when ROOT/<good_dir> exists."""
    root = _existing_root(root)
    if (root / "train" / GOOD_TYPE).is_dir():
        return "mvtec"
    if (root / "test").is_dir() and not (root / good_dir).is_dir():
        return "mvtec"
    if (root / good_dir).is_dir():
        return "folder"
    raise DataError(
        f"cannot tell the layout of {root}: no train/good or {good_dir}/ folder; "
        f"{MVTEC_LAYOUT}; or {FOLDER_LAYOUT}"
    )


def records_for(
    root: str | Path,
    split: Split = "test",
    *,
    masks: bool = True,
    good_dir: str = GOOD_TYPE,
    defect_dirs: Sequence[str] | None = None,
    mask_dir: str | None = None,
    roi_dir: str | None = None,
) -> list[Record]:
    """Records of `split`, whichever layout ROOT has.

    Folder layout: train = good images only, test = all images. mask_dir, roi_dir,
    good_dir and defect_dirs only apply to the folder layout; masks=False drops masks in
    both. dataset_listing also says what was skipped.
    """
    return dataset_listing(root, split, masks=masks, good_dir=good_dir, defect_dirs=defect_dirs,
                           mask_dir=mask_dir, roi_dir=roi_dir).records


def dataset_listing(
    root: str | Path,
    split: Split = "test",
    *,
    masks: bool = True,
    good_dir: str = GOOD_TYPE,
    defect_dirs: Sequence[str] | None = None,
    mask_dir: str | None = None,
    roi_dir: str | None = None,
) -> Listing:
    """records_for and the entries that were not read, with reasons."""
    _check_split(split)
    if detect_layout(root, good_dir) == "mvtec":
        if roi_dir is not None:
            raise ConfigError(f"{display(Path(root))} is in the MVTec layout, whose ROIs are read "
                              f"from ROOT/roi/<split>/<type>/<stem>_roi.png; roi_dir (--roi-dir) "
                              f"is for the folder layout: drop it")
        return mvtec_listing(root, split, masks=masks)
    listing = folder_listing(root, good_dir, defect_dirs, mask_dir if masks else None, roi_dir)
    if split == "train":
        listing.records = [r for r in listing.records if r.label == GOOD]
    return listing


# ----------------------------------------------------------------------------- helpers


def _type_records(
    type_dir: Path,
    mask_folder: Path | None,
    mask_suffixes: tuple[str, ...],
    roi_folder: Path | None,
    *,
    hint: str,
    roi_suffixes: tuple[str, ...] = ("_roi",),
    good_type: str = GOOD_TYPE,
    require_masks: bool = True,
) -> tuple[list[Record], list[Skipped]]:
    """Records of one type folder, and its entries that are not images.

    With a mask folder and require_masks, a defect image without its mask is an error;
    without require_masks its mask_path is left None (the caller checks the whole split).
    """
    images, skipped = leaf_listing(type_dir, NESTED)
    if not images:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        found = f"; skipped: {'; '.join(map(str, skipped[:3]))}" if skipped else ""
        raise DataError(f"folder {display(type_dir)} has no images ({exts}{found}); {hint}")
    is_good = type_dir.name == good_type
    defect_type = GOOD_TYPE if is_good else type_dir.name
    masks = _index(mask_folder) if mask_folder is not None and not is_good else None
    rois = _index(roi_folder)
    records = []
    for image in images:
        mask = None
        if masks is not None:
            mask = _sidecar(masks, image.stem, mask_suffixes)
            if mask is None and require_masks:
                assert mask_folder is not None  # masks is only indexed from a mask folder
                raise _missing_mask(image, mask_folder, mask_suffixes)
        roi = _sidecar(rois, image.stem, roi_suffixes)
        records.append(Record(image, GOOD if is_good else DEFECT, defect_type, mask, roi))
    return records, skipped


def _missing_mask(
    image: Path, folder: Path, suffixes: tuple[str, ...], context: str = ""
) -> DataError:
    expected = " or ".join(str(folder / f"{image.stem}{s}.png") for s in suffixes)
    return DataError(
        f"defect image {image} has no mask{context}: expected {expected}; add the mask, or "
        "evaluate image-level only with --no-masks (masks=False in Python)"
    )


def _index(folder: Path | None) -> dict[str, Path]:
    """Image files of a folder by lower-cased name (empty if the folder is absent)."""
    if folder is None or not folder.is_dir():
        return {}
    return {p.name.lower(): p for p in folder.iterdir() if is_image_file(p)}


def _sidecar(index: dict[str, Path], stem: str, suffixes: tuple[str, ...]) -> Path | None:
    """First of <stem><suffix><ext> found, trying suffixes in order, any image extension."""
    for suffix in suffixes:
        for ext in (".png", *sorted(IMAGE_EXTENSIONS - {".png"})):
            hit = index.get(f"{stem}{suffix}{ext}".lower())
            if hit is not None:
                return hit
    return None


def _existing_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"dataset folder {root} {what}; check the path")
    return root


def _root_skips(root_scan: FolderScan, layout: tuple[str, ...], folder_reason: str) -> list[Skipped]:
    """Entries of a dataset root that look like data but are not read: images and anything
    named like one, and folders outside the layout. Hidden entries and other files
    (readme.txt, license.txt, meta.json) are documentation and not listed."""
    out = []
    for e in root_scan.entries:
        if e.kind == "hidden" or e.path.name in layout:
            continue
        if e.kind == "image":
            out.append(Skipped(e.path, LOOSE_IN_ROOT))
        elif e.kind == "folder":
            out.append(Skipped(e.path, "a folder named like an image" if e.named_like_image
                               else folder_reason))
        elif e.named_like_image:  # broken, or an image extension that is not a regular file
            out.append(Skipped(e.path, e.reason))
    return out


def _split_skips(split_scan: FolderScan) -> list[Skipped]:
    """Entries of an MVTec split folder other than its type folders and loose images (an
    error): hidden folders, and entries named like images that are not readable files."""
    out = []
    for e in split_scan.entries:
        if e.kind == "hidden" and e.path.is_dir():
            out.append(Skipped(e.path, e.reason))
        elif e.kind in ("broken", "file") and e.named_like_image:
            out.append(Skipped(e.path, e.reason))
    return out


def _reject_annotation_folders(folders: list[Path], fix: str) -> None:
    """A masks/ (ground_truth, roi, labels...) folder read as a defect class would score
    every mask as a defective image: refuse the ambiguous layout."""
    for folder in folders:
        if folder.name.lower() in ANNOTATION_NAMES:
            raise DataError(
                f"{display(folder)} is named like an annotation folder, but it is where the "
                f"layout expects a defect type (its files would be scored as defective "
                f"images); {fix}; or rename it if it really is a defect type")


def _reject_loose_images(split_scan: FolderScan, fix: str) -> None:
    """Images directly in a split folder have no type; refuse rather than ignore them."""
    loose = split_scan.images
    if loose:
        raise DataError(
            f"{len(loose)} image(s) directly in {display(split_scan.folder)} (e.g. "
            f"{display(loose[0].name)}) have no type folder; {fix}"
        )


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
