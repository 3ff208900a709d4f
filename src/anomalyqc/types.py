"""The few types that travel through the whole pipeline.

files -> Sample -> Batch -> Detector.predict -> Prediction. Images are float tensors in
[0, 1], shape (C, H, W); masks are float tensors in {0, 1}, shape (1, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GOOD = 0
DEFECT = 1


@dataclass
class Sample:
    """One image with what we know about it."""

    image: torch.Tensor  # (C, H, W) float32 in [0, 1]
    label: int = GOOD  # 0 good, 1 defect
    mask: torch.Tensor | None = None  # (1, H, W) defect mask, None if unknown
    roi: torch.Tensor | None = None  # (1, H, W) region of interest, None = whole image
    defect_type: str = "good"
    path: str = ""


@dataclass
class Batch:
    """Samples stacked along a first dimension; masks stay None unless every sample has one."""

    image: torch.Tensor  # (B, C, H, W)
    label: torch.Tensor  # (B,) int64
    mask: torch.Tensor | None = None  # (B, 1, H, W)
    roi: torch.Tensor | None = None  # (B, 1, H, W)
    defect_type: list[str] = field(default_factory=list)
    path: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @classmethod
    def collate(cls, samples: list[Sample]) -> Batch:
        """torch DataLoader collate_fn: stacks images; a mask for a good image is all zeros."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        images = torch.stack([s.image for s in samples])
        labels = torch.tensor([int(s.label) for s in samples], dtype=torch.int64)
        mask = None
        if all(s.mask is not None or s.label == GOOD for s in samples) and any(
            s.mask is not None for s in samples
        ):
            _, _, h, w = images.shape
            mask = torch.stack(
                [s.mask if s.mask is not None else torch.zeros(1, h, w) for s in samples]
            )
        roi = None
        if any(s.roi is not None for s in samples):
            _, _, h, w = images.shape
            roi = torch.stack([s.roi if s.roi is not None else torch.ones(1, h, w) for s in samples])
        return cls(
            image=images,
            label=labels,
            mask=mask,
            roi=roi,
            defect_type=[s.defect_type for s in samples],
            path=[s.path for s in samples],
        )

    @classmethod
    def from_images(cls, images: torch.Tensor) -> Batch:
        """A batch of unlabelled images (labels set to GOOD), for inference from tensors."""
        if images.ndim == 3:
            images = images.unsqueeze(0)
        n = images.shape[0]
        return cls(image=images, label=torch.zeros(n, dtype=torch.int64), path=[""] * n)


@dataclass
class Prediction:
    """What a detector says about a batch."""

    score: torch.Tensor  # (B,) image anomaly score, higher = more anomalous
    anomaly_map: torch.Tensor  # (B, 1, H, W) at input size
    reconstruction: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # other per-image scores (B,) a detector reports beside `score`, by name
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
