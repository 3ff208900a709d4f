"""MhBC-PatchCore (thesis 8.3.5, appendix D): Mahalanobis-based clusters per grid location.

At each location (h, w): online covariance Sigma_hw (appendix C), Cholesky Sigma = L L^T,
whitening z = L^{-1}(phi - mu) by triangular solve (eq. 8.37), K centroids from cumulative
K-Means on the whitened embeddings (eq. 8.38) and, at test time, the Euclidean distance of a
whitened embedding to its nearest centroid (eq. 8.40), which is the Mahalanobis distance to
that centroid in the original space. Training memory does not depend on the number of images.

One streaming pass: K-Means assignments use the Cholesky factor of the moments seen so far,
refreshed each time the image count grows by `refresh_growth`; centroids are kept as running
sums in the original space and whitened with the final factor at the end (the centroid of
whitened points is the whitened centroid, so nothing is lost by deferring).

passes=2 is the thesis's order: pass 1 accumulates the moments, pass 2 runs the cumulative
K-Means on embeddings whitened with the final factor (the backbone runs twice; the batches
must be re-iterable, e.g. a DataLoader).

Ablations (table 8.3), each in both readings the text allows:
- "single covariance": covariance="pooled" keeps each location's mean and shares one pooled
  within-location covariance; covariance="global" treats all locations as one distribution
  (one mean, the total covariance).
- "Euclidean K-Means": covariance="none" clusters raw embeddings per location without
  whitening; the global-bank reading is PatchCore with coreset="kmeans".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import Field

from anomalyqc.errors import ConfigError, DataError
from anomalyqc.models.base import DetectorConfig, register
from anomalyqc.models.embedding import EmbeddingConfig, EmbeddingDetector, moment_shapes
from anomalyqc.models.storage import tensor
from anomalyqc.progress import Progress
from anomalyqc.stats.kmeans import OnlineKMeans, pairwise_sqdist
from anomalyqc.stats.local_coreset import local_farthest_points
from anomalyqc.stats.moments import OnlineMoments
from anomalyqc.stats.whitening import cholesky, whiten
from anomalyqc.types import Batch


class MhbcConfig(EmbeddingConfig):
    # No neighbourhood averaging and a lighter blur: the Gaussian model's map loses its
    # localisation under either (ablation in benchmarks/README.md, measured on MVTec bottle
    # and on generated vial strips and patches).
    patch_size: int = Field(1, ge=1)
    blur_sigma: float = Field(2.0, ge=0)
    n_clusters: int = Field(16, ge=1)  # K centroids per location
    clustering: Literal["kmeans", "coreset"] = "kmeans"
    covariance: Literal["local", "pooled", "global", "none"] = "local"
    passes: Literal[1, 2] = 1  # 2 = moments first, then K-Means with the final factor
    eps: float = Field(1.0, gt=0)  # covariance regularisation (B.6, D.3), as PaDiM's
    init_images: int = Field(32, ge=1)  # images buffered to seed K-Means (bounded memory)
    # refactorise when the image count grew by this fraction (0: at every batch)
    refresh_growth: float = Field(1.0, ge=0)
    # clustering="coreset": fraction of images kept per location
    coreset_ratio: float = Field(0.1, gt=0, le=1)
    # Save the running moments and K-Means sums/counts so that runs can be merged later
    # (`anomalyqc merge`); the moments are as large as the Cholesky factors.
    keep_moments: bool = True


@register
class Mhbc(EmbeddingDetector):
    name = "mhbc"
    config_cls = MhbcConfig
    config: MhbcConfig

    def __init__(self, config: DetectorConfig | dict[str, Any] | None = None,
                 **params: Any) -> None:
        super().__init__(config, **params)
        self.moments: OnlineMoments | None = None
        self.kmeans: OnlineKMeans | None = None
        self.mean: torch.Tensor | None = None  # (P or 1, D)
        self.chol: torch.Tensor | None = None  # (P or 1, D, D), None for covariance="none"
        self.centroids: torch.Tensor | None = None  # (P, K, D), whitened

    # ------------------------------------------------------------------ fit
    def fit(self, batches: Iterable[Batch], progress: Progress | None = None) -> Mhbc:
        self.reset()
        if self.config.clustering == "coreset":
            return self._fit_coreset(batches, progress)
        if self.config.passes == 2:
            return self._fit_two_pass(batches, progress)
        factor_at = 0
        mean = chol = None
        for x in self.stream_embeddings(batches, progress):
            if self.moments is None:
                self.moments = OnlineMoments(x.shape[1], x.shape[2])
                self.kmeans = self._new_kmeans(x.shape[1], x.shape[2])
            assert self.kmeans is not None  # created with the moments
            self.moments.update(x)
            # Factorise only when K-Means is about to assign points, and then only when the
            # image count has grown enough to matter: O(log N) factorisations per fit.
            assigns = self.kmeans.initialised or \
                self.kmeans.buffered + x.shape[0] >= self.kmeans.init_size
            if assigns and self.config.covariance != "none" and self.moments.count >= 2 and (
                    self.moments.count >= factor_at * (1 + self.config.refresh_growth)):
                mean = chol = None  # free the old factor before building the new one
                mean, chol = self._metric(self.moments)
                factor_at = self.moments.count
            self.kmeans.update(x, mean, chol)
        if self.moments is None or self.moments.count < 2:
            raise DataError("MhBC-PatchCore needs at least 2 training images")
        del mean, chol  # the streaming factor: finalise builds the final one
        return self.finalise()

    def _new_kmeans(self, locations: int, dim: int) -> OnlineKMeans:
        return OnlineKMeans(locations, dim, self.config.n_clusters,
                            init_size=max(self.config.init_images, self.config.n_clusters),
                            seed=self.config.seed)

    def _fit_two_pass(self, batches: Iterable[Batch], progress: Progress | None) -> Mhbc:
        """Thesis order: all moments first, then K-Means in the final whitened space."""
        if iter(batches) is batches:
            raise ConfigError("passes=2 reads the training images twice: pass a re-iterable "
                              "such as a DataLoader or a list, not a one-shot iterator")
        for x in self.stream_embeddings(batches, progress, "pass 1 of 2 (moments)"):
            if self.moments is None:
                self.moments = OnlineMoments(x.shape[1], x.shape[2])
            self.moments.update(x)
        if self.moments is None or self.moments.count < 2:
            raise DataError("MhBC-PatchCore needs at least 2 training images")
        mean = chol = None
        if self.config.covariance != "none":
            mean, chol = self._metric(self.moments)
        self.kmeans = self._new_kmeans(self.moments.locations, self.moments.dim)
        backbone_s = self.fit_timings.get("backbone_seconds", 0.0)
        for x in self.stream_embeddings(batches, progress, "pass 2 of 2 (K-Means)"):
            self.kmeans.update(x, mean, chol)
        self.fit_timings["backbone_seconds"] += backbone_s
        del mean, chol
        return self.finalise()

    def _fit_coreset(self, batches: Iterable[Batch], progress: Progress | None) -> Mhbc:
        """Greedy coreset per location in whitened space: keeps all embeddings (not streaming)."""
        chunks = []
        for x in self.stream_embeddings(batches, progress):
            if self.moments is None:
                self.moments = OnlineMoments(x.shape[1], x.shape[2])
            self.moments.update(x)
            chunks.append(x)
        if self.moments is None or self.moments.count < 2:
            raise DataError("MhBC-PatchCore needs at least 2 training images")
        if self.config.covariance != "none":
            self.mean, self.chol = self._metric(self.moments)
        z = self._whiten(torch.cat(chunks).transpose(0, 1))  # (P, N, D)
        n = max(1, int(round(self.config.coreset_ratio * z.shape[1])))
        idx = local_farthest_points(z, n, self.config.seed)
        self.centroids = z.gather(1, idx.unsqueeze(-1).expand(-1, -1, z.shape[2])).float()
        self.fitted = True
        return self

    def reset(self) -> None:
        super().reset()
        self.moments = self.kmeans = None
        self.mean = self.chol = self.centroids = None

    def merge(self, *others: Mhbc) -> Mhbc:
        """Fold in models fitted on other shards: moments merge exactly; the K centroids are
        re-clustered from all shards' weighted centroids, in the merged metric (K-Means has
        no exact merge; see OnlineKMeans.merge_all)."""
        moments: list[OnlineMoments] = []
        clusters: list[OnlineKMeans] = []
        for det in (self, *others):
            if det.moments is None or det.kmeans is None:
                raise ValueError("merge needs models fitted with clustering='kmeans' that kept "
                                 "their moments: fitted in this process, or saved with "
                                 "keep_moments=true")
            moments.append(det.moments)
            clusters.append(det.kmeans)
        for other in others:
            self.check_same_reduction(other)
        for m in moments[1:]:
            moments[0].merge(m)
        return self.merge_clusters(clusters[1:])

    def merge_clusters(self, others: list[OnlineKMeans]) -> Mhbc:
        """Re-cluster this model's and other shards' K-Means states in the metric of the
        (already merged) moments; shared by `merge` and the sharded fit."""
        assert self.moments is not None and self.kmeans is not None
        mean, chol = (None, None) if self.config.covariance == "none" else \
            self._metric(self.moments)
        self.kmeans.merge_all(others, mean, chol)
        return self.finalise()

    def finalise(self) -> Mhbc:
        assert self.moments is not None and self.kmeans is not None
        self.mean = self.chol = None
        if self.config.covariance != "none":
            self.mean, self.chol = self._metric(self.moments)
        self.kmeans.finish_init(self.mean, self.chol)
        raw = self.kmeans.centroids()  # (P, K, D) float64, original space
        counts = self.kmeans.fitted_state()[1]
        empty = counts <= 0
        if bool(empty.any()):  # an empty cluster duplicates the location's fullest one
            fullest = counts.argmax(dim=1)
            best = raw[torch.arange(raw.shape[0]), fullest]
            raw = torch.where(empty.unsqueeze(-1), best.unsqueeze(1), raw)
        self.centroids = self._whiten(raw.float())
        self.fitted = True
        return self

    def _metric(self, moments: OnlineMoments) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and Cholesky factor of the (regularised) covariance: per location, one pooled
        within-location factor with per-location means, or one global distribution."""
        if self.config.covariance == "pooled":
            return moments.mean().float(), cholesky(moments.within_covariance(self.config.eps)).float()
        m = moments.pooled() if self.config.covariance == "global" else moments
        return m.mean().float(), m.cholesky(self.config.eps)

    def _whiten(self, x: torch.Tensor) -> torch.Tensor:
        """(P, N, D) -> whitened (P, N, D); identity for the Euclidean ablation."""
        if self.chol is None:
            return x
        return whiten(x.float(), self.learnt(self.mean), self.chol)

    # ------------------------------------------------------------------ predict
    def patch_scores(self, emb: torch.Tensor) -> torch.Tensor:
        z = self._whiten(emb.transpose(0, 1))  # (P, B, D)
        d2 = pairwise_sqdist(z, self.learnt(self.centroids))  # (P, B, K)
        return d2.amin(dim=-1).sqrt().transpose(0, 1)

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {**self.base_state(), "centroids": self.learnt(self.centroids)}
        if self.chol is not None:
            out.update(mean=self.learnt(self.mean), chol=self.chol)
        if self.config.keep_moments and self.moments is not None and self.kmeans is not None \
                and self.kmeans.initialised:
            out.update(self.moments.state())
            out.update(self.kmeans.state())
        return out

    def state_shapes(self, p: int, d: int) -> dict[str, tuple[int | None, ...]]:
        # K-Means keeps n_clusters per location; a coreset keeps a fraction of the images
        k = self.config.n_clusters if self.config.clustering == "kmeans" else None
        shapes: dict[str, tuple[int | None, ...]] = {"centroids": (p, k, d)}
        if self.config.covariance != "none":
            shared = self.config.covariance in ("pooled", "global")
            shapes["mean"] = (1 if self.config.covariance == "global" else p, d)
            shapes["chol"] = (1 if shared else p, d, d)
        if self.config.clustering == "kmeans":
            shapes.update(moment_shapes(p, d), **{"kmeans.sums": (p, k, d),
                                                 "kmeans.counts": (p, k)})
        return shapes

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_base_state(tensors)
        self.centroids = tensor(tensors, "centroids").float()
        if self.config.covariance == "none":
            self.mean = self.chol = None
        else:
            self.mean = tensor(tensors, "mean").float()
            self.chol = tensor(tensors, "chol").float()
        if self.centroids.ndim != 3:
            raise ValueError(f"centroids have shape {tuple(self.centroids.shape)}")
        # Runs saved without moments still predict; they just cannot be merged.
        self.moments = self.kmeans = None
        if "moments.count" in tensors and "kmeans.sums" in tensors:
            self.moments = OnlineMoments.from_state(tensors)
            self.kmeans = OnlineKMeans.from_state(tensors, seed=self.config.seed)
