"""PatchCore (thesis 8.3.3): a memory bank of training patch embeddings, cut down by a greedy
k-center coreset (eq. 8.39) searched in a fixed random projection (eq. 8.34); the anomaly score
of a patch is its distance to the nearest bank entry (eq. 8.18).

Unlike PaDiM and MhBC-PatchCore, the fit needs every training embedding before the coreset can
be chosen (table 8.1): they wait on disk, but their projections are searched in memory, so the
fit's memory grows with the dataset (about 1 GB per 2M patches at coreset_dim 128).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from typing import IO, Any, Literal

import numpy as np
import torch
from pydantic import Field

from anomalyqc.errors import DataError
from anomalyqc.models.base import DetectorConfig, register
from anomalyqc.models.embedding import EmbeddingConfig, EmbeddingDetector
from anomalyqc.models.storage import tensor
from anomalyqc.progress import Progress
from anomalyqc.stats.coreset import greedy_coreset
from anomalyqc.stats.kmeans import OnlineKMeans
from anomalyqc.stats.knn import NearestNeighbour
from anomalyqc.stats.projection import gaussian_random_matrix
from anomalyqc.types import Batch


class PatchcoreConfig(EmbeddingConfig):
    # "reweighted": the PatchCore paper's s* scaled by how dense the bank is around the nearest
    # entry m* (1 - softmax of the distances to m*'s n_neighbors bank neighbours).
    # PatchCore accepts one more image score than its base, which mypy reads as an unsafe
    # override of the field's type; pydantic validates each config class by its own field.
    image_score: Literal["map_max", "patch_max", "reweighted"] = "map_max"  # type: ignore[assignment]
    n_neighbors: int = Field(9, ge=1)
    coreset_ratio: float = Field(0.1, gt=0, le=1)
    # "greedy": k-center coreset (eq. 8.39). "kmeans": the bank is the centroids of a
    # cumulative K-Means over all patch embeddings (thesis table 8.3's Euclidean ablation).
    coreset: Literal["greedy", "kmeans"] = "greedy"
    coreset_dim: int = Field(128, ge=0)  # random projection (eq. 8.34) for the greedy search
    # clustered and flat are exact (clustered prunes by the triangle inequality); hnsw is not
    index: Literal["clustered", "flat", "hnsw"] = "clustered"


@register
class Patchcore(EmbeddingDetector):
    name = "patchcore"
    config_cls = PatchcoreConfig
    config: PatchcoreConfig

    def __init__(self, config: DetectorConfig | dict[str, Any] | None = None,
                 **params: Any) -> None:
        super().__init__(config, **params)
        self.bank: torch.Tensor | None = None
        self._nn: NearestNeighbour | None = None

    def reset(self) -> None:
        super().reset()
        self.bank = None
        self._nn = None

    def fit(self, batches: Iterable[Batch], progress: Progress | None = None) -> Patchcore:
        self.reset()
        # Each batch's raw embeddings go straight to a temporary file, and so do their random
        # projections (eq. 8.34) on which the coreset is searched. Only the projections are
        # then read back, into one array: the raw embeddings never sit in memory together,
        # and only the chosen rows are read back at the end.
        with (tempfile.TemporaryFile(prefix="anomalyqc-patchcore-raw-") as raw_file,
              tempfile.TemporaryFile(prefix="anomalyqc-patchcore-keys-") as key_file):
            total, dim, proj = 0, 0, np.empty((0, 0), np.float32)
            for x in self.stream_embeddings(batches, progress):
                c = x.reshape(-1, x.shape[-1]).numpy()
                if total == 0:
                    dim = c.shape[1]
                    proj = self._projection(dim)
                c.tofile(raw_file)
                if proj.size:
                    np.ascontiguousarray(c @ proj, dtype=np.float32).tofile(key_file)
                total += c.shape[0]
            if total == 0:
                raise DataError("PatchCore needs at least 1 training image")
            n = max(1, int(round(self.config.coreset_ratio * total)))
            if self.config.coreset == "kmeans":
                self.bank = self._kmeans_bank(raw_file, total, dim, n)
                self.fitted = True
                return self
            keys = _read_floats(key_file if proj.size else raw_file, total)
            idx = np.sort(self.coreset_indices(keys, n, progress))
            del keys
            raw_file.flush()
            raw = np.memmap(raw_file, dtype=np.float32, mode="r", shape=(total, dim))
            self.bank = torch.from_numpy(np.ascontiguousarray(raw[idx]))
            del raw
        self._nn = None
        self.fitted = True
        return self

    def _kmeans_bank(self, raw_file: IO[bytes], total: int, dim: int, n: int) -> torch.Tensor:
        """Cumulative K-Means with n centroids over the raw embeddings, read back in shuffled
        chunks (a seeded order, so the seeding buffer is not one corner of the images)."""
        raw_file.flush()
        raw = np.memmap(raw_file, dtype=np.float32, mode="r", shape=(total, dim))
        km = OnlineKMeans(1, dim, n, init_size=min(total, 4 * n), seed=self.config.seed)
        order = np.random.default_rng(self.config.seed).permutation(total)
        step = max(4096, n)
        for start in range(0, total, step):
            idx = np.sort(order[start : start + step])
            km.update(torch.from_numpy(np.ascontiguousarray(raw[idx])).unsqueeze(1))
        km.finish_init()
        del raw
        keep = km.fitted_state()[1][0] > 0
        return km.centroids()[0][keep].float().contiguous()

    def _projection(self, dim: int) -> np.ndarray:
        """Fixed random projection for the coreset search (eq. 8.34); empty = none."""
        if self.config.coreset_dim and self.config.coreset_dim < dim:
            return gaussian_random_matrix(dim, self.config.coreset_dim, self.config.seed).numpy()
        return np.empty((0, 0), dtype=np.float32)

    def coreset_indices(self, search: np.ndarray, n: int,
                        progress: Progress | None = None) -> np.ndarray:
        if n >= search.shape[0]:
            return np.arange(search.shape[0])
        if progress is None:
            return greedy_coreset(search, n, seed=self.config.seed)
        what = f"{self.name}: coreset {n} of {search.shape[0]}"
        report = progress
        report(what, 0, n)
        return greedy_coreset(search, n, seed=self.config.seed,
                              progress=lambda k: report(what, k, n))

    def merge(self, *others: Patchcore, size: int | None = None) -> Patchcore:
        """Fold in models fitted on other shards: a greedy coreset of the union of the banks.

        Approximate: each bank is a coreset of its own shard, and a coreset of their union is
        not the coreset one fit on all the images would pick (measured in benchmarks/README.md,
        "Sharded fits"). `size` is the bank size wanted; by default the union is kept whole,
        which is as large as the banks together, i.e. coreset_ratio of all the shards' patches.
        """
        banks: list[torch.Tensor] = []
        for det in (self, *others):
            if det is not self:
                self.check_same_reduction(det)
            if det.bank is None or (banks and det.bank.shape[1] != banks[0].shape[1]):
                raise ValueError("cannot merge PatchCore banks of different embedding sizes")
            banks.append(det.bank)
        union = torch.cat(banks)
        n = union.shape[0] if size is None else max(1, min(size, union.shape[0]))
        if n < union.shape[0]:
            c = union.numpy()
            proj = self._projection(c.shape[1])
            keys = np.ascontiguousarray(c @ proj if proj.size else c, dtype=np.float32)
            idx = np.sort(self.coreset_indices(keys, n))
            union = union[torch.from_numpy(idx)]
        self.bank = union.contiguous()
        self._nn = None
        self.fitted = True
        return self

    @property
    def nn(self) -> NearestNeighbour:
        if self._nn is None:
            self._nn = NearestNeighbour(self.learnt(self.bank).numpy(), kind=self.config.index,
                                        seed=self.config.seed)
        return self._nn

    def patch_scores(self, emb: torch.Tensor) -> torch.Tensor:
        b, p, d = emb.shape
        dist = self.nn.distance(emb.reshape(b * p, d).numpy())
        return torch.from_numpy(dist).reshape(b, p)

    def image_scores(self, emb: torch.Tensor, scores: torch.Tensor) -> torch.Tensor | None:
        if self.config.image_score == "reweighted":
            return reweighted_scores(emb, scores, self.learnt(self.bank), self.config.n_neighbors)
        return super().image_scores(emb, scores)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.base_state(), "memory_bank": self.learnt(self.bank)}

    def state_shapes(self, p: int, d: int) -> dict[str, tuple[int | None, ...]]:
        return {"memory_bank": (None, d)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_base_state(tensors)
        bank = tensor(tensors, "memory_bank").float().contiguous()
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"memory bank has shape {tuple(bank.shape)}")
        self.bank = bank
        self._nn = None


def reweighted_scores(emb: torch.Tensor, scores: torch.Tensor, bank: torch.Tensor,
                      n_neighbors: int) -> torch.Tensor:
    """The PatchCore paper's image score: s* (the largest patch distance) times
    1 - softmax over the distances from that patch to the n_neighbors bank entries nearest to
    its own nearest entry m* (m* first). A patch whose m* sits in a sparse part of the bank
    keeps more of its score than one near a dense, well-sampled mode.

    emb (B, P, D), scores (B, P), bank (N, D) -> (B,).
    """
    rows = torch.arange(emb.shape[0])
    worst = scores.argmax(dim=1)
    query = emb[rows, worst].float()  # (B, D)
    d_query = torch.cdist(query, bank)  # (B, N)
    m_star = d_query.argmin(dim=1)
    k = min(n_neighbors, bank.shape[0])
    support = torch.cdist(bank[m_star], bank).topk(k, largest=False).indices  # (B, k), m* first
    support[:, 0] = m_star  # exact ties in the bank must not move m* out of first place
    weight = 1.0 - torch.softmax(d_query.gather(1, support), dim=1)[:, 0]
    return weight * scores[rows, worst]


def _read_floats(f: IO[bytes], rows: int) -> np.ndarray:
    """The whole of a temporary float32 file as a (rows, -1) array."""
    f.flush()
    f.seek(0)
    return np.fromfile(f, dtype=np.float32).reshape(rows, -1)
