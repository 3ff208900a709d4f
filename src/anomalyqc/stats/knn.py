"""Nearest-neighbour search over a memory bank, with faiss.

kind="flat": exact brute force (one GEMM). kind="pruned": also exact, and cheaper for large
banks: a search in a low-dimensional space whose distances are lower bounds of the true ones
picks a few candidates, which are re-ranked exactly; a query whose certificate fails (its
k-th lower bound is below the best exact distance found) falls back to brute force.
kind="hnsw": a graph index, approximate.
"""

from __future__ import annotations

import numpy as np

KINDS = ("flat", "pruned", "hnsw")


class NearestNeighbour:
    """1-NN Euclidean distance from queries to a fixed bank of vectors."""

    def __init__(self, bank: np.ndarray, kind: str = "flat", hnsw_m: int = 32,
                 ef_search: int = 64, threads: int = 0, pruned_dim: int = 48,
                 candidates: int = 8) -> None:
        import faiss  # imported lazily: only PatchCore needs it

        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty (N, D) array, got {bank.shape}")
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}: use one of {', '.join(KINDS)}")
        if threads:
            faiss.omp_set_num_threads(threads)
        self.kind = kind
        self.bank = bank
        self.fallbacks = 0  # queries the pruned search had to brute-force (for benchmarks)
        dim = bank.shape[1]
        self.flat = faiss.IndexFlatL2(dim)
        self.flat.add(bank)
        if kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m)
            self.index.hnsw.efConstruction = max(40, 2 * hnsw_m)
            self.index.hnsw.efSearch = ef_search
            self.index.add(bank)
        elif kind == "pruned" and pruned_dim + 1 < dim and bank.shape[0] > candidates:
            self._build_pruned(bank, pruned_dim, candidates, faiss)
        else:
            self.kind = "flat"

    def _build_pruned(self, bank: np.ndarray, r: int, k: int, faiss) -> None:  # noqa: ANN001
        """Lower-bound space: top-r principal directions plus the norm of the residual.

        For x = mu + P a + R e:  |q - b|^2 = |a_q - a_b|^2 + |e_q - e_b|^2
        >= |a_q - a_b|^2 + (|e_q| - |e_b|)^2, the squared distance of [a, |e|] vectors.
        """
        self.mu = bank.mean(axis=0)
        centred = bank - self.mu
        _, _, vt = np.linalg.svd(centred[:: max(1, len(bank) // 20000)], full_matrices=False)
        self.basis = np.ascontiguousarray(vt[:r].T)  # (D, r)
        self.k = k
        self.index = faiss.IndexFlatL2(r + 1)
        self.index.add(self._lower_bound_space(bank))

    def _lower_bound_space(self, x: np.ndarray) -> np.ndarray:
        c = x - self.mu
        a = c @ self.basis
        resid = np.sqrt(np.maximum((c * c).sum(1) - (a * a).sum(1), 0.0))
        return np.ascontiguousarray(np.hstack([a, resid[:, None]]), dtype=np.float32)

    def distance(self, queries: np.ndarray) -> np.ndarray:
        """Euclidean distance of each query (M, D) to its nearest bank vector -> (M,)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.kind == "flat":
            sq, _ = self.flat.search(q, 1)
            return np.sqrt(np.maximum(sq[:, 0], 0.0))
        if self.kind == "hnsw":
            sq, _ = self.index.search(q, 1)
            return np.sqrt(np.maximum(sq[:, 0], 0.0))
        lower, idx = self.index.search(self._lower_bound_space(q), self.k)
        cand = self.bank[idx]  # (M, k, D)
        diff = cand - q[:, None, :]
        exact = np.einsum("mkd,mkd->mk", diff, diff).min(axis=1)
        # Certificate: every bank vector outside the candidates has a lower bound >= the
        # k-th candidate's; if that is >= the best exact distance, the answer is exact.
        # A small relative margin absorbs float32 rounding in the two computations.
        unsure = lower[:, -1] * (1 - 1e-4) < exact
        if unsure.any():
            self.fallbacks += int(unsure.sum())
            sq, _ = self.flat.search(q[unsure], 1)
            exact[unsure] = sq[:, 0]
        return np.sqrt(np.maximum(exact, 0.0))
