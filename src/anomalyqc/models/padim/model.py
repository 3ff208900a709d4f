"""PaDiM (thesis 8.3.2, appendix B): a Gaussian per grid location, Mahalanobis distance map.

Mean and covariance come from online moments (appendix C) in float64, so a fit streams over
any number of images in the memory of one; the covariance gets eps * I (B.6) and is factorised
once, Sigma = L L^T, and the distance of phi is ||z|| with L z = phi - mu (appendix D).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from pydantic import Field

from anomalyqc.errors import DataError
from anomalyqc.models.base import DetectorConfig, register
from anomalyqc.models.embedding import EmbeddingConfig, EmbeddingDetector, moment_shapes
from anomalyqc.models.storage import tensor
from anomalyqc.progress import Progress
from anomalyqc.stats.moments import OnlineMoments
from anomalyqc.stats.whitening import whiten
from anomalyqc.types import Batch


class PadimConfig(EmbeddingConfig):
    # No neighbourhood averaging and a lighter blur: the Gaussian model's map loses its
    # localisation under either (ablation in benchmarks/README.md, measured on MVTec bottle
    # and on generated vial strips and patches).
    patch_size: int = Field(1, ge=1)
    blur_sigma: float = Field(2.0, ge=0)
    # Covariance regularisation (B.6). The thesis's 0.01 leaves the per-location covariances'
    # noisiest directions in; 1 did better on bottle and on three generated sets
    # (benchmarks/README.md, "Covariance regularisation"). --set eps=0.01 for the thesis's.
    eps: float = Field(1.0, gt=0)
    # Save the running moments with the model so that runs can be merged later
    # (`anomalyqc merge`); they are as large as the Cholesky factors (P x D(D+1)/2 float64).
    keep_moments: bool = True


@register
class Padim(EmbeddingDetector):
    name = "padim"
    config_cls = PadimConfig
    config: PadimConfig

    def __init__(self, config: DetectorConfig | dict[str, Any] | None = None,
                 **params: Any) -> None:
        super().__init__(config, **params)
        self.moments: OnlineMoments | None = None
        self.mean: torch.Tensor | None = None  # (P, D)
        self.chol: torch.Tensor | None = None  # (P, D, D)

    def fit(self, batches: Iterable[Batch], progress: Progress | None = None) -> Padim:
        self.reset()
        for x in self.stream_embeddings(batches, progress):
            if self.moments is None:
                self.moments = OnlineMoments(x.shape[1], x.shape[2])
            self.moments.update(x)
        if self.moments is None or self.moments.count < 2:
            raise DataError("PaDiM needs at least 2 training images")
        return self.finalise()

    def reset(self) -> None:
        super().reset()
        self.moments = None
        self.mean = self.chol = None

    def merge(self, *others: Padim) -> Padim:
        """Add the statistics of models fitted on other shards (exact: moments add up)."""
        shards: list[OnlineMoments] = []
        for det in (self, *others):
            if det.moments is None:
                raise ValueError("merge needs models that kept their moments: fitted in this "
                                 "process, or saved with keep_moments=true")
            shards.append(det.moments)
        for other in others:
            self.check_same_reduction(other)
        for moments in shards[1:]:
            shards[0].merge(moments)
        return self.finalise()

    def finalise(self) -> Padim:
        assert self.moments is not None
        self.mean = self.moments.mean().float()
        self.chol = self.moments.cholesky(self.config.eps)
        self.fitted = True
        return self

    def patch_scores(self, emb: torch.Tensor) -> torch.Tensor:
        z = whiten(emb.transpose(0, 1), self.learnt(self.mean), self.learnt(self.chol))  # (P, B, D)
        return z.norm(dim=-1).transpose(0, 1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {**self.base_state(), "mean": self.learnt(self.mean), "chol": self.learnt(self.chol)}
        if self.config.keep_moments and self.moments is not None:
            out.update(self.moments.state())
        return out

    def state_shapes(self, p: int, d: int) -> dict[str, tuple[int | None, ...]]:
        return {"mean": (p, d), "chol": (p, d, d), **moment_shapes(p, d)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_base_state(tensors)
        self.mean = tensor(tensors, "mean").float()
        self.chol = tensor(tensors, "chol").float()
        # Runs saved without moments still predict; they just cannot be merged.
        self.moments = OnlineMoments.from_state(tensors) if "moments.count" in tensors else None
        if self.chol.shape[:2] != self.mean.shape:
            raise ValueError(f"mean {tuple(self.mean.shape)} and Cholesky factor "
                             f"{tuple(self.chol.shape)} disagree")
