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
from typing import Literal

import numpy as np
import torch

from anomalyqc.errors import DataError
from anomalyqc.models.base import register
from anomalyqc.models.embedding import EmbeddingConfig, EmbeddingDetector
from anomalyqc.models.storage import tensor
from anomalyqc.stats.coreset import greedy_coreset
from anomalyqc.stats.knn import NearestNeighbour
from anomalyqc.stats.projection import gaussian_random_matrix
from anomalyqc.types import Batch


class PatchcoreConfig(EmbeddingConfig):
    coreset_ratio: float = 0.1
    coreset_dim: int = 128  # random projection (eq. 8.34) used only for the coreset search
    # clustered and flat are exact (clustered prunes by the triangle inequality); hnsw is not
    index: Literal["clustered", "flat", "hnsw"] = "clustered"


@register
class Patchcore(EmbeddingDetector):
    name = "patchcore"
    config_cls = PatchcoreConfig
    config: PatchcoreConfig

    def __init__(self, config=None, **params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, **params)
        self.bank: torch.Tensor | None = None
        self._nn: NearestNeighbour | None = None

    def fit(self, batches: Iterable[Batch], progress: bool = False) -> Patchcore:
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

    def _projection(self, dim: int) -> np.ndarray:
        """Fixed random projection for the coreset search (eq. 8.34); empty = none."""
        if self.config.coreset_dim and self.config.coreset_dim < dim:
            return gaussian_random_matrix(dim, self.config.coreset_dim, self.config.seed).numpy()
        return np.empty((0, 0), dtype=np.float32)

    def coreset_indices(self, search: np.ndarray, n: int, progress: bool) -> np.ndarray:
        if n >= search.shape[0]:
            return np.arange(search.shape[0])
        if not progress:
            return greedy_coreset(search, n, seed=self.config.seed)
        from rich.progress import Progress

        with Progress(transient=False) as bar:
            task = bar.add_task(f"{self.name}: coreset {n} of {search.shape[0]}", total=n)
            return greedy_coreset(search, n, seed=self.config.seed,
                                  progress=lambda k: bar.update(task, completed=k))

    def merge(self, *others: Patchcore, size: int | None = None) -> Patchcore:
        """Fold in models fitted on other shards: a greedy coreset of the union of the banks.

        Approximate: each bank is a coreset of its own shard, and a coreset of their union is
        not the coreset one fit on all the images would pick (measured in benchmarks/README.md,
        "Sharded fits"). `size` is the bank size wanted; by default the union is kept whole,
        which is as large as the banks together, i.e. coreset_ratio of all the shards' patches.
        """
        for other in others:
            self.check_same_reduction(other)
            if other.bank is None or self.bank is None or other.bank.shape[1] != self.bank.shape[1]:
                raise ValueError("cannot merge PatchCore banks of different embedding sizes")
        union = torch.cat([self.bank, *(o.bank for o in others)])  # type: ignore[misc]
        n = union.shape[0] if size is None else max(1, min(size, union.shape[0]))
        if n < union.shape[0]:
            c = union.numpy()
            proj = self._projection(c.shape[1])
            keys = np.ascontiguousarray(c @ proj if proj.size else c, dtype=np.float32)
            idx = np.sort(self.coreset_indices(keys, n, progress=False))
            union = union[torch.from_numpy(idx)]
        self.bank = union.contiguous()
        self._nn = None
        self.fitted = True
        return self

    @property
    def nn(self) -> NearestNeighbour:
        if self._nn is None:
            self._nn = NearestNeighbour(self.bank.numpy(), kind=self.config.index,
                                        seed=self.config.seed)
        return self._nn

    def patch_scores(self, emb: torch.Tensor) -> torch.Tensor:
        b, p, d = emb.shape
        dist = self.nn.distance(emb.reshape(b * p, d).numpy())
        return torch.from_numpy(dist).reshape(b, p)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.base_state(), "memory_bank": self.bank}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_base_state(tensors)
        bank = tensor(tensors, "memory_bank").float().contiguous()
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"memory bank has shape {tuple(bank.shape)}")
        self.bank = bank
        self._nn = None


def _read_floats(f, rows: int) -> np.ndarray:  # noqa: ANN001
    """The whole of a temporary float32 file as a (rows, -1) array."""
    f.flush()
    f.seek(0)
    return np.fromfile(f, dtype=np.float32).reshape(rows, -1)
