"""A torch Dataset that reads Records lazily into Samples, and a DataLoader helper.

Pixels are read in __getitem__ only, so a dataset of any size streams through a
DataLoader. The channel count is fixed when the dataset is built (not on first access),
so that every DataLoader worker agrees on it.

ROI files that a layout finds (Record.roi_path) are read only with rois=True, which the
workflow sets for the detectors that use ROIs (Detector.uses_roi: GRD-Net, which scores
inside them, and the ROI-restricted anomaly synthesis). The embedding detectors score the
whole image, so for them Sample.roi stays None and the dataset says so once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from anomalyqc.data.io import read_image, read_mask
from anomalyqc.data.layouts import Record
from anomalyqc.data.transforms import ImageTransform, check_channels, convert_noted
from anomalyqc.errors import AnomalyQCError, ConfigError, DataError
from anomalyqc.types import Batch, Sample


class ImageDataset(Dataset[Sample]):
    """Samples from records, transformed by `transform`.

    channels: 1 or 3 converts every image (gray <-> RGB); None takes the transform's
    channels, and if that is None too, the channel count of the first image, and then a
    later image with a different count is an error (a silently mixed dataset would train a
    model on inconsistent input). rois: read the records' ROI masks into Sample.roi (for a
    detector that uses them); off, they are not opened and a warning says they are unused.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: ImageTransform,
        channels: int | None = None,
        rois: bool = False,
    ) -> None:
        check_channels(channels)
        if not records:
            raise DataError("the dataset has no images; check the dataset folder and split")
        self.records = list(records)
        self.transform = transform
        explicit = channels if channels is not None else transform.channels
        self.convert = explicit is not None
        self.channels: int = explicit if explicit is not None else self._first_channels()
        self.rois = rois
        if not rois:
            self._note_unused_rois()

    def _first_channels(self) -> int:
        return int(read_image(self.records[0].path, notes=self.transform.notes).shape[2])

    def _note_unused_rois(self) -> None:
        rois = [str(r.roi_path.parent) for r in self.records if r.roi_path is not None]
        if rois:
            self.transform.notes.warn(
                "roi",
                f"ROI masks in {os.path.commonpath(rois)} are not used by this detector, "
                "which scores the whole image (GRD-Net uses them)",
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        image = self._read_image(record.path)
        mask = self._read_aligned(record.mask_path, record.path, image, "mask")
        roi_path = record.roi_path if self.rois else None
        roi = self._read_aligned(roi_path, record.path, image, "ROI")
        image_t, mask_t, roi_t = self.transform(image, mask, roi, source=record.path)
        return Sample(
            image=image_t,
            label=record.label,
            mask=mask_t,
            roi=roi_t,
            defect_type=record.defect_type,
            path=str(record.path),
        )

    def _read_image(self, path: Path) -> np.ndarray:
        image = read_image(path, notes=self.transform.notes)
        if image.shape[2] == self.channels:
            return image
        if self.convert:
            return convert_noted(image, self.channels, self.transform.notes, path)
        first = self.records[0].path
        raise DataError(
            f"image {path} has {image.shape[2]} channel(s) but the dataset has {self.channels} "
            f"(from the first image, {first}); convert all images with --channels 1 (gray) "
            "or --channels 3 (RGB)"
        )

    @staticmethod
    def _read_aligned(
        path: Path | None, image_path: Path, image: np.ndarray, kind: str
    ) -> np.ndarray | None:
        """Read a mask/ROI at native size and refuse one that does not match its image.

        Resizing a mismatched mask would quietly misplace it, so this is an error.
        """
        if path is None:
            return None
        mask = read_mask(path)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"{kind} {path} is {_hw(mask.shape)} but its image {image_path} is "
                f"{_hw(image.shape)}; save the {kind} at the image's size"
            )
        return mask


def make_loader(
    dataset: Dataset[Sample], batch_size: int, shuffle: bool = False, num_workers: int = 0
) -> DataLoader[Sample]:
    """A DataLoader yielding anomalyqc Batches."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be 0 or more, got {num_workers}")
    return _Loader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=Batch.collate,
    )


class _Loader(DataLoader[Sample]):
    """A DataLoader whose worker errors read as the worker raised them. torch re-raises an
    exception from a worker process with the worker's whole traceback as its message, which
    turns a one-line DataError into a page; this puts the one line back."""

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except AnomalyQCError as exc:
                message = _worker_message(exc)
                if message is None:
                    raise
                raise type(exc)(message) from None
            yield batch


def _worker_message(exc: AnomalyQCError) -> str | None:
    """The original message of an error torch wrapped in a worker traceback, else None."""
    text = str(exc)
    marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    if not text.startswith("Caught ") or marker not in text:
        return None
    return text.rsplit(marker, 1)[1].strip()


def _hw(shape: tuple[int, ...]) -> str:
    """'HxW' (height x width), the order used in every size message."""
    return f"{shape[0]}x{shape[1]} (HxW)"
