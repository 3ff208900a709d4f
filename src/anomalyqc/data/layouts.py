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

Sidecar files (masks, ROIs) may have any image extension. Mask/image size mismatches are
checked when a sample is loaded (see ImageDataset), since that needs the pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from anomalyqc.data.io import IMAGE_EXTENSIONS, is_image_file, list_images
from anomalyqc.errors import ConfigError, DataError
from anomalyqc.types import DEFECT, GOOD

Split = Literal["train", "test"]
Layout = Literal["mvtec", "folder"]

GOOD_TYPE = "good"
MVTEC_LAYOUT = (
    "expected the MVTec AD layout: ROOT/train/good/*.png, ROOT/test/<defect>/*.png, "
    "ROOT/ground_truth/<defect>/<name>_mask.png"
)
FOLDER_LAYOUT = "expected the folder layout: ROOT/good/*.png, ROOT/<defect>/*.png"


@dataclass
class Record:
    """Where one sample lives on disk and what we know about it before reading it."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None
    roi_path: Path | None = None


# --------------------------------------------------------------------------- MVTec AD


def mvtec_records(root: str | Path, split: Split = "train", masks: bool = True) -> list[Record]:
    """Records of one split of an MVTec AD style dataset, sorted by type then name.

    masks=True reads the masks the split has: all defect images' or none (image labels
    only); masks for some but not all is an error. masks=False ignores masks altogether
    (image-level evaluation of a partly annotated dataset).
    """
    root = _existing_root(root)
    _check_split(split)
    if split == "train" and not (root / "train" / GOOD_TYPE).is_dir():
        raise DataError(f"{root} has no train/good folder (training needs good images); "
                        f"{MVTEC_LAYOUT}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{root} has no {split}/ folder ({split_dir}); {MVTEC_LAYOUT}")
    _reject_loose_images(split_dir, f"put them in {split_dir / GOOD_TYPE} or {split_dir}/<defect>")
    records: list[Record] = []
    for type_dir in _subfolders(split_dir):
        mask_folder = root / "ground_truth" / type_dir.name
        roi_folder = root / "roi" / split / type_dir.name
        records += _type_records(
            type_dir,
            mask_folder if masks else None,
            ("_mask",),
            roi_folder,
            hint="add images or remove the folder",
            require_masks=False,
        )
    if not records:
        raise DataError(f"split folder {split_dir} has no images; {MVTEC_LAYOUT}")
    _check_all_or_no_masks(records, root)
    return records


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
    records: list[Record] = []
    for type_dir in [good, *_defect_folders(root, good_dir, defect_dirs, (mask_dir, roi_dir))]:
        records += _type_records(
            type_dir,
            mask_root / type_dir.name if mask_root else None,
            ("", "_mask"),
            roi_root / type_dir.name if roi_root else None,
            hint=hint,
            roi_suffixes=("", "_roi"),
            good_type=good_dir,
        )
    return records


def _defect_folders(
    root: Path,
    good_dir: str,
    defect_dirs: Sequence[str] | None,
    reserved: Iterable[str | None],
) -> list[Path]:
    """The named defect folders (each must exist), or every other non-hidden subfolder."""
    if defect_dirs is None:
        skip = {good_dir, *(r for r in reserved if r)}
        return [d for d in _subfolders(root) if d.name not in skip]
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
    both.
    """
    _check_split(split)
    if detect_layout(root, good_dir) == "mvtec":
        return mvtec_records(root, split, masks=masks)
    records = folder_records(root, good_dir, defect_dirs, mask_dir if masks else None, roi_dir)
    if split == "train":
        records = [r for r in records if r.label == GOOD]
    return records


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
) -> list[Record]:
    """Records of one type folder.

    With a mask folder and require_masks, a defect image without its mask is an error;
    without require_masks its mask_path is left None (the caller checks the whole split).
    """
    images = list_images(type_dir)
    if not images:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"folder {type_dir} has no images ({exts}); {hint}")
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
    return records


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


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _reject_loose_images(split_dir: Path, fix: str) -> None:
    """Images directly in a split folder have no type; refuse rather than ignore them."""
    loose = list_images(split_dir)
    if loose:
        raise DataError(
            f"{len(loose)} image(s) directly in {split_dir} (e.g. {loose[0].name}) have no "
            f"type folder; {fix}"
        )


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
