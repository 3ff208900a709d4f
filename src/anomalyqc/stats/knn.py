"""Nearest-neighbour search over a memory bank, with faiss (exact flat or HNSW)."""

from __future__ import annotations

import numpy as np


class NearestNeighbour:
    """1-NN Euclidean distance from queries to a fixed bank of vectors.

    kind="flat" is exact; kind="hnsw" is a graph index, approximate but far faster for large
    banks (PatchCore's paper uses approximate search too). Set `threads` to limit faiss's
    OpenMP pool (0 = faiss default).
    """

    def __init__(self, bank: np.ndarray, kind: str = "flat", hnsw_m: int = 32,
                 ef_search: int = 64, threads: int = 0) -> None:
        import faiss  # imported lazily: only PatchCore needs it

        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty (N, D) array, got {bank.shape}")
        if threads:
            faiss.omp_set_num_threads(threads)
        self.kind = kind
        dim = bank.shape[1]
        if kind == "flat":
            self.index = faiss.IndexFlatL2(dim)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m)
            self.index.hnsw.efConstruction = max(40, 2 * hnsw_m)
            self.index.hnsw.efSearch = ef_search
        else:
            raise ValueError(f"unknown index kind {kind!r}: use 'flat' or 'hnsw'")
        self.index.add(bank)

    def distance(self, queries: np.ndarray) -> np.ndarray:
        """Euclidean distance of each query (M, D) to its nearest bank vector -> (M,)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        sq, _ = self.index.search(q, 1)
        return np.sqrt(np.maximum(sq[:, 0], 0.0))
