"""The detector contract and the registry that maps CLI names to classes.

A detector follows scikit-learn's estimator contract: parameters in the constructor (a
pydantic config), `fit` on good images, `predict` to scores and anomaly maps, `save`/`load`
to a run folder of safetensors + JSON (see models/storage.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from anomalyqc.data.transforms import as_hw
from anomalyqc.errors import ConfigError
from anomalyqc.models.validation import parameter_error
from anomalyqc.progress import Progress
from anomalyqc.types import Batch, Prediction

D = TypeVar("D", bound="Detector")


class DetectorConfig(BaseModel):
    """Parameters every detector has: the input it expects."""

    # NaN or inf in a parameter (eps=NaN) would reach the scores: refused like any bad value.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    image_size: int | tuple[int, int] = 256  # an int is a square, a pair is (height, width)
    crop_size: int | tuple[int, int] | None = None
    channels: int | None = None  # fixed at fit time from the data when left unset

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """pydantic reads true as 1; in a number parameter it is a typo, not a value."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and field.annotation is not bool:
                    raise ValueError(f"{key}={value!r}: must be a number, not true/false")
        return data

    @field_validator("channels")
    @classmethod
    def _gray_or_rgb(cls, v: int | None) -> int | None:
        if v not in (None, 1, 3):
            raise ValueError("must be 1 (gray), 3 (RGB) or null (from the data)")
        return v

    @model_validator(mode="after")
    def _crop_inside_image(self) -> DetectorConfig:
        if self.crop_size is not None:
            (ch, cw), (ih, iw) = as_hw(self.crop_size), as_hw(self.image_size)
            if ch > ih or cw > iw:
                raise ValueError(f"crop_size {ch}x{cw} must fit inside image_size {ih}x{iw} "
                                 f"(the crop is taken after resizing)")
        return self

    @field_validator("image_size", "crop_size", mode="before")
    @classmethod
    def _positive_size(cls, v: Any) -> int | tuple[int, int] | None:
        if v is None:
            return v
        try:
            h, w = as_hw(tuple(v) if isinstance(v, list) else v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return h if h == w else (h, w)


class Detector(ABC):
    name: ClassVar[str]
    config_cls: ClassVar[type[DetectorConfig]] = DetectorConfig
    # True: fit and inference read the data's ROI masks into Batch.roi when it has them
    # (GRD-Net's attention, the ROI-restricted anomaly synthesis); False: never opened.
    uses_roi: ClassVar[bool] = False
    # True: fit learns from labelled images, good and defective (Batch.label, defect_type
    # and mask; see workflow.training_listing); False: from good images only.
    supervised: ClassVar[bool] = False

    def __init__(self, config: DetectorConfig | dict[str, Any] | None = None, **params: Any) -> None:
        base = config.model_dump() if isinstance(config, BaseModel) else dict(config or {})
        base.update(params)
        try:
            self.config = self.config_cls(**base)
        except ValidationError as exc:
            raise parameter_error(self.name, self.config_cls.model_fields, exc) from None
        self.fitted = False
        # Set when the model is saved to or loaded from a run folder (models/storage.py):
        # what thresholds, reports and predictions record to name the model they came from.
        self.model_id: str | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the images the detector takes, after resize and optional crop."""
        return as_hw(self.config.crop_size or self.config.image_size)

    @property
    def needs_roi(self) -> bool:
        """Whether every image given to predict must come with an ROI (a model trained on
        ROIs whose output outside them means nothing)."""
        return False

    @abstractmethod
    def fit(self: D, batches: Iterable[Batch], progress: Progress | None = None) -> D:
        """Learn from good images only (labels are ignored), or from labelled images when
        the detector is `supervised`; `progress` is called as batches go by (see
        anomalyqc.progress)."""

    @abstractmethod
    def predict(self, images: torch.Tensor | Batch) -> Prediction:
        """Image scores (B,) and anomaly maps (B, 1, H, W) at input size."""

    def merge(self: D, *others: D) -> D:
        """Fold in models of the same kind fitted on other data (see each detector); raises
        ValueError when they cannot be combined."""
        raise ValueError(f"{self.name} models cannot be merged")

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything learnt, as named tensors (what goes into weights.safetensors)."""

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of state_tensors; raises KeyError/ValueError on missing or bad tensors."""

    def check_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Raise ValueError when saved tensors do not fit this config (called before
        load_state_tensors; detectors that can tell override it)."""

    def save(self, run_dir: str | Path) -> Path:
        from anomalyqc.models.storage import save_detector

        return save_detector(self, run_dir)

    @classmethod
    def load(cls, run_dir: str | Path) -> Detector:
        from anomalyqc.models.storage import load_detector

        det = load_detector(run_dir)
        if not isinstance(det, cls):
            raise ConfigError(f"{run_dir} holds a {det.name} model, not {cls.name}")
        return det


REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    REGISTRY[cls.name] = cls
    return cls


def detector_class(name: str) -> type[Detector]:
    import anomalyqc.models  # noqa: F401  (fills the registry)

    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown detector {name!r}; choose one of: "
                          f"{', '.join(sorted(REGISTRY))}") from None


def images_of(images: torch.Tensor | Batch) -> torch.Tensor:
    return images.image if isinstance(images, Batch) else images
